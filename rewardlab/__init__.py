"""rewardlab: train Bradley–Terry reward models with Lightning and Hydra."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

PACKAGE = Path(__file__).resolve().parent
__version__ = "0.1.0"


def _hydra_job():  # the running job's Hydra config, or None outside a Hydra app (e.g. the compose API)
    from hydra.core.hydra_config import HydraConfig

    return HydraConfig.get() if HydraConfig.initialized() else None


def _sweep_group() -> str | None:
    """In a multirun, the sweep folder's name, so a sweep's runs group together on wandb."""
    job = _hydra_job()
    return Path(job.sweep.dir).name if job is not None and str(job.mode) == "RunMode.MULTIRUN" else None


def _job_overrides() -> list[str]:
    """This job's command-line overrides (the options it varies), trimmed to wandb's 64-char tag limit."""
    job = _hydra_job()
    return [o[:64] for o in job.overrides.task] if job is not None else []


def _job_name() -> str | None:
    """In a multirun, the job's overrides joined (e.g. `freeze=lora`), naming its wandb run."""
    job = _hydra_job()
    return (job.job.override_dirname or None) if _sweep_group() else None


def _recipe_lr(scale: str, *, _root_: Any) -> float:
    """The backbone's recipe learning rate (`recipe.lr`, conf/backbone/) times `scale`: the optimizer
    options' default rate."""
    from rewardlab.errors import UserError

    lr = OmegaConf.select(_root_, "recipe.lr", default=None)
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not 0 < lr < float("inf"):
        raise UserError(
            f"recipe.lr: the optimizer's rate is the backbone's recipe rate times {scale}; expected a finite number "
            f"> 0, got {lr!r} (a backbone option of your own: a `# @package _global_` file with `backbone:` and a "
            "top-level `recipe: {lr: ...}`, as rewardlab/conf/backbone/*.yaml; or set optimizer.lr=...)"
        )
    return float(lr) * float(scale)


# Resolvers used in conf/: `${rl_cwd:}` is the folder the command runs in (outputs and caches go
# under it, as Hydra's do), `${rl_package:}` the installed package (its embedded data), `${rl_recipe_lr:k}`
# the backbone's recipe.lr times k (an optimizer's rate).
OmegaConf.register_new_resolver("rl_cwd", os.getcwd, replace=True)
OmegaConf.register_new_resolver("rl_recipe_lr", _recipe_lr, replace=True)
OmegaConf.register_new_resolver("rl_package", lambda: str(PACKAGE), replace=True)
OmegaConf.register_new_resolver("rl_sweep_group", _sweep_group, replace=True)
OmegaConf.register_new_resolver("rl_job_overrides", _job_overrides, replace=True)
OmegaConf.register_new_resolver("rl_job_name", _job_name, replace=True)
