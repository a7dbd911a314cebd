"""rewardlab: train Bradley–Terry reward models with Lightning and Hydra."""

from __future__ import annotations

import hashlib
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


def _swept_keys(job: Any) -> set[str]:
    """The keys a multirun sweeps: those given several values on its command line or in
    `hydra.sweeper.params` (an experiment preset's)."""
    import sys

    from hydra.core.override_parser.overrides_parser import OverridesParser

    params = job.sweeper.get("params") or {}
    candidates = [a for a in sys.argv[1:] if "=" in a and not a.startswith("-")]
    candidates += [f"{k}={v}" for k, v in params.items()]
    written = Path(job.sweep.dir) / "multirun.yaml"  # the sweep's own command line, for launchers (submitit)
    try:  # that run each job under their own entry point, with their own argv
        candidates += list(OmegaConf.load(written).hydra.overrides.task)
    except Exception:  # noqa: BLE001 - no such file or not Hydra's: the argv and preset keys above stand
        pass
    keys, parser = set(), OverridesParser.create()
    for text in candidates:
        try:
            override = parser.parse_overrides([text])[0]
        except Exception:  # noqa: BLE001 - not an override (e.g. a script's own argument): not swept
            continue
        if override.is_sweep_override():
            keys.add(override.key_or_group)
    return keys


def _job_type(default: str) -> str:
    """In a multirun, this job's values of the swept keys other than `seed` (e.g. `freeze=lora`): the seeds
    of one setting share a wandb job_type, so the dashboard groups them as the report does; else `default`."""
    job = _hydra_job()
    if not _sweep_group():
        return default
    swept = _swept_keys(job) - {"seed"}
    kept = ",".join(o for o in job.overrides.task if o.split("=", 1)[0].lstrip("+~") in swept)
    if len(kept) > 64:  # wandb's limit: cut, and keep settings that share a long start apart
        kept = f"{kept[:55]}~{hashlib.sha256(kept.encode()).hexdigest()[:8]}"
    return kept or default


def _recipe_lr(scale: str, *, _root_: Any) -> float:
    """The backbone's recipe learning rate (`recipe.lr`, conf/backbone/) times `scale` (the optimizer
    option's factor) times `recipe.lr_scale` (1 unless swept): the optimizer options' default rate."""
    from rewardlab.errors import UserError

    lr = OmegaConf.select(_root_, "recipe.lr", default=None)
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not 0 < lr < float("inf"):
        raise UserError(
            f"recipe.lr: the optimizer's rate is the backbone's recipe rate times {scale}; expected a finite number "
            f"> 0, got {lr!r} (a backbone option of your own: a `# @package _global_` file with `backbone:` and a "
            "top-level `recipe: {lr: ...}`, as rewardlab/conf/backbone/*.yaml; or set optimizer.lr=...)"
        )
    lr_scale = OmegaConf.select(_root_, "recipe.lr_scale", default=1.0)
    if isinstance(lr_scale, bool) or not isinstance(lr_scale, (int, float)) or not 0 < lr_scale < float("inf"):
        raise UserError(
            f"recipe.lr_scale: expected a finite number > 0 (it multiplies the recipe's rate), got {lr_scale!r}"
        )
    return float(lr) * float(scale) * float(lr_scale)


# Resolvers used in conf/: `${rl_cwd:}` is the folder the command runs in (outputs and caches go
# under it, as Hydra's do), `${rl_package:}` the installed package (its embedded data), `${rl_recipe_lr:k}`
# the backbone's recipe.lr times k (an optimizer's rate).
OmegaConf.register_new_resolver("rl_cwd", os.getcwd, replace=True)
OmegaConf.register_new_resolver("rl_recipe_lr", _recipe_lr, replace=True)
OmegaConf.register_new_resolver("rl_package", lambda: str(PACKAGE), replace=True)
OmegaConf.register_new_resolver("rl_sweep_group", _sweep_group, replace=True)
OmegaConf.register_new_resolver("rl_job_overrides", _job_overrides, replace=True)
OmegaConf.register_new_resolver("rl_job_name", _job_name, replace=True)
OmegaConf.register_new_resolver("rl_job_type", _job_type, replace=True)
