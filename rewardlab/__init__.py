"""rewardlab: train Bradley–Terry reward models with Lightning and Hydra."""

from pathlib import Path

from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parent.parent

# `${rl_root:}` in conf/paths points at the repository root, wherever the command runs from.
OmegaConf.register_new_resolver("rl_root", lambda: str(ROOT), replace=True)

__version__ = "0.1.0"
