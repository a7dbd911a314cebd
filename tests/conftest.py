"""Shared fixtures: offline environment, config composition, tiny runs."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # hub names must fail fast, never hang on the network
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["WANDB_MODE"] = "offline"
os.environ["WANDB_SILENT"] = "true"
os.environ["TOKENIZERS_PARALLELISM"] = "false"
os.environ["XDG_CACHE_HOME"] = __import__("tempfile").mkdtemp(prefix="rewardlab-tests-")  # speed.json of CLI runs

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402
from hypothesis import settings  # noqa: E402
from omegaconf import DictConfig, open_dict  # noqa: E402

import rewardlab  # noqa: E402,F401  (registers the config resolvers)
from rewardlab.backbones import tiny  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
CONF = ROOT / "rewardlab" / "conf"
FIXTURES = Path(__file__).parent / "fixtures"

# `make test` (and CI) draws the same property-test examples every run, so a red run is the code's doing and
# reproduces; `make fuzz` draws new ones each time, to look for what the fixed draw misses.
settings.register_profile("repeatable", parent=settings.get_profile("ci"))  # derandomized, no database, no deadline
settings.register_profile("explore", parent=settings.get_profile("default"), deadline=None)
settings.load_profile("repeatable")

FAST = [
    "trainer.max_epochs=1",
    "trainer.limit_train_batches=4",
    "trainer.limit_val_batches=2",
    "trainer.limit_test_batches=2",
    "trainer.num_sanity_val_steps=0",
    "trainer.log_every_n_steps=1",
    "trainer.enable_model_summary=false",
    "~callbacks.progress_bar",
]


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One tokenized-data cache for the whole session, outside the repository."""
    return tmp_path_factory.mktemp("cache")


def compose_config(name: str, overrides: list[str], output_dir: Path, cache_dir: Path) -> DictConfig:
    """conf/<name>.yaml composed with overrides, writing into `output_dir`, caching into `cache_dir`."""
    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose(name, overrides=overrides)
    with open_dict(cfg):
        cfg.paths.output_dir = str(output_dir)
        cfg.paths.cache_dir = str(cache_dir)
        cfg.paths.speed_file = str(cache_dir / "speed.json")
    return cfg


@pytest.fixture
def make_cfg(tmp_path: Path, cache_dir: Path):
    """Compose conf/train.yaml with overrides, writing into a fresh run folder."""

    def _make(*overrides: str, fast: bool = True, folder: str = "run") -> DictConfig:
        """`folder`: the run folder's name under tmp_path (a folder holds one run)."""
        return compose_config(
            "train", [*(FAST if fast else []), "logger=none", *overrides], tmp_path / folder, cache_dir
        )

    return _make


def reward_model(
    backbone,
    freeze=None,
    head_lr_mult: float = 1.0,
    disable_dropout: bool = False,
    share_prompt: bool | str = False,
    head=None,
    loss=None,
):
    """A RewardModel with test defaults: Bradley–Terry, AdamW, no schedule, no feature cache, a linear head."""
    from functools import partial

    import torch

    from rewardlab import freeze as strategies
    from rewardlab.heads import LinearHead
    from rewardlab.losses import BradleyTerry
    from rewardlab.model import RewardModel

    return RewardModel(
        backbone,
        loss or BradleyTerry(),
        partial(torch.optim.AdamW, lr=1e-3, weight_decay=0.1),
        None,
        freeze or strategies.full,
        head or LinearHead,
        head_lr_mult,
        None,
        gradient_checkpointing=False,
        disable_dropout=disable_dropout,
        compile=False,
        feature_cache_dir=None,
        skip_nonfinite=False,
        share_prompt=share_prompt,
        pooling="last",
    )


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return tiny("llama", 32, 1, 2, 64, 128, 0.0).tokenizer
