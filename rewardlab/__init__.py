"""rewardlab: train Bradley–Terry reward models with Lightning and Hydra."""

from __future__ import annotations

import os
from pathlib import Path

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


# Resolvers used in conf/: `${rl_cwd:}` is the folder the command runs in (outputs and caches go
# under it, as Hydra's do), `${rl_package:}` the installed package (its embedded data), `${rl_times:x,k}`
# x times k (an optimizer's rate from the backbone's recipe).
OmegaConf.register_new_resolver("rl_cwd", os.getcwd, replace=True)
OmegaConf.register_new_resolver("rl_times", lambda x, k: float(x) * float(k), replace=True)
OmegaConf.register_new_resolver("rl_package", lambda: str(PACKAGE), replace=True)
OmegaConf.register_new_resolver("rl_sweep_group", _sweep_group, replace=True)
OmegaConf.register_new_resolver("rl_job_overrides", _job_overrides, replace=True)
OmegaConf.register_new_resolver("rl_job_name", _job_name, replace=True)
