"""Train a reward model: `python -m rewardlab.train [group=option ...] [key=value ...]`.

Builds everything from `conf/train.yaml` with `hydra.utils.instantiate`, fits, tests when a test
split exists, and writes `results.json` into the run folder. Console script: `rewardlab-train`.
"""

from __future__ import annotations

import gc
import json
import logging
import resource
import time
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from hydra.utils import instantiate
from lightning.pytorch.loggers import Logger
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf

from rewardlab.callbacks import Throughput
from rewardlab.data.module import PreferenceDataModule
from rewardlab.data.rows import DataError
from rewardlab.model import RewardModel
from rewardlab.redaction import redact
from rewardlab.run import build, build_trainer, finish_loggers

log = logging.getLogger(__name__)

PREEMPTED_EXIT_CODE = 143  # 128 + SIGTERM, what a shell reports for a job ended by SIGTERM


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def count_parameters(model: torch.nn.Module) -> dict[str, int]:
    return {
        "params/total": sum(p.numel() for p in model.parameters()),
        "params/trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
    }


def resume_path(cfg: DictConfig) -> str | None:
    """The checkpoint to resume from: `ckpt_path` itself, or for `last` the newest of this run folder's
    `checkpoints/last.ckpt` and Lightning's SLURM `hpc_ckpt_*.ckpt` (none yet: a fresh start)."""
    if cfg.ckpt_path is None:
        return None
    if cfg.ckpt_path == "last":
        out = Path(cfg.paths.output_dir)
        found = [p for p in [out / "checkpoints" / "last.ckpt", *out.glob("hpc_ckpt_*.ckpt")] if p.is_file()]
        if not found:
            log.info("ckpt_path=last: no checkpoint in %s yet, starting fresh", out)
            return None
        newest = max(found, key=lambda p: p.stat().st_mtime)
        log.info("ckpt_path=last: resuming from %s", newest)
        return str(newest)
    if not Path(cfg.ckpt_path).is_file():
        raise FileNotFoundError(f"ckpt_path: no such checkpoint {cfg.ckpt_path!r} (a .ckpt file, or `last`)")
    return str(cfg.ckpt_path)


def fit_and_test(
    cfg: DictConfig, trainer: L.Trainer, datamodule: PreferenceDataModule, model: RewardModel
) -> dict[str, Any]:
    """Fit, then test the best checkpoint when there is a test split; the metrics of both."""
    trainer.fit(model, datamodule=datamodule, ckpt_path=resume_path(cfg), weights_only=True)
    results: dict[str, Any] = {k: v.item() for k, v in trainer.callback_metrics.items() if v.numel() == 1}
    if cfg.test and datamodule.has_test():
        best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
        if Path(best).is_file():  # memory-mapped: the weights are read, the optimizer state never is
            model.load_state_dict(torch.load(best, map_location="cpu", mmap=True, weights_only=True)["state_dict"])
        trainer.test(model, datamodule=datamodule, ckpt_path=best if best and not Path(best).is_file() else None)
        results |= {k: v.item() for k, v in trainer.callback_metrics.items() if k.startswith("test/")}
        results["test/checkpoint"] = best or "final weights"
    return results


def train(cfg: DictConfig) -> dict[str, Any]:
    """Fit (and test) as configured; write and return `results.json`. The experiment loggers are
    always closed with the run's exit status, and a failure is logged to the run's log file."""
    started = time.time()
    loggers: list[Logger] = []
    try:
        L.seed_everything(cfg.seed, workers=True)
        datamodule, model = build(cfg)
        callbacks = [instantiate(c) for c in (cfg.callbacks or {}).values() if c is not None]
        loggers = [  # redacted: wandb tags and names hold this job's overrides, resolved
            instantiate(redact(OmegaConf.to_container(c, resolve=True))) for c in (cfg.logger or {}).values() if c
        ]
        trainer = build_trainer(cfg, callbacks=callbacks, logger=loggers or False)
        params = count_parameters(model)
        log.info("parameters: %d total, %d trainable", params["params/total"], params["params/trainable"])
        for lg in trainer.loggers:
            lg.log_hyperparams({**model.run_config, **params})
        results = fit_and_test(cfg, trainer, datamodule, model)
        for callback in callbacks:
            if isinstance(callback, Throughput):
                results |= callback.results()
        results |= (
            params
            | datamodule.counts()
            | {
                "train/skipped_nonfinite": model.skipped_nonfinite,
                "global_step": trainer.global_step,
                "peak_rss_mb": peak_rss_mb(),
                "wall_s": time.time() - started,
            }
        )
        if trainer.is_global_zero:
            numbers = {k: v for k, v in results.items() if isinstance(v, (int, float))}
            for lg in trainer.loggers:
                lg.log_metrics(numbers, step=trainer.global_step)
            path = Path(cfg.paths.output_dir) / "results.json"
            path.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
            log.info("results: %s", path)
    except SIGTERMException:
        log.warning(
            "stopped by SIGTERM; resume with ckpt_path=%s (or ckpt_path=last with hydra.run.dir=%s)",
            Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt",
            cfg.paths.output_dir,
        )
        finish_loggers(loggers, exit_code=PREEMPTED_EXIT_CODE)
        raise SystemExit(PREEMPTED_EXIT_CODE) from None
    except BaseException as e:
        log.error("run failed: %s: %s", type(e).__name__, e, exc_info=not isinstance(e, DataError))
        finish_loggers(loggers, exit_code=1)
        raise
    finish_loggers(loggers, exit_code=0)
    return results


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    try:
        results = train(cfg)
    finally:  # Lightning's objects refer to each other in cycles: free this job's model, optimizer state,
        gc.collect()  # data maps and open files now, not with the next multirun job already loaded
    metric = cfg.get("optimized_metric")
    return results.get(metric) if metric else None


if __name__ == "__main__":
    main()
