"""Train a reward model: `python -m rewardlab.train [group=option ...] [key=value ...]`.

Builds everything from `conf/train.yaml` with `hydra.utils.instantiate`, fits, tests when a test
split exists, and writes `results.json` into the run folder. Console script: `rewardlab-train`.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import re
import resource
import time
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from hydra.utils import instantiate
from lightning.pytorch.loggers import Logger, WandbLogger
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from rewardlab.callbacks import Throughput
from rewardlab.data import DataError, PreferenceDataModule, ensure_pad_token
from rewardlab.model import RewardModel

log = logging.getLogger(__name__)

SECRET_NAME = re.compile(r"TOKEN|SECRET|PASSWORD|API_KEY|APIKEY|ACCESS_KEY|CREDENTIAL", re.IGNORECASE)
PREEMPTED_EXIT_CODE = 143  # 128 + SIGTERM, what a shell reports for a job ended by SIGTERM


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def count_parameters(model: torch.nn.Module) -> dict[str, int]:
    return {
        "params/total": sum(p.numel() for p in model.parameters()),
        "params/trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
    }


def finish_loggers(loggers: list[Logger], exit_code: int) -> None:
    """Flush every logger and close every wandb run with the job's exit status, so runs of a
    multirun never merge and a failed run does not show as finished."""
    for lg in loggers:
        lg.finalize("success" if exit_code == 0 else "failed")
        if isinstance(lg, WandbLogger) and lg._experiment is not None:
            lg.experiment.finish(exit_code=exit_code)


def redact(value: Any) -> Any:
    """`value` with every occurrence of a secret from the environment (a variable named like a token,
    key or password: WANDB_API_KEY, HF_TOKEN, ...) replaced by `***`. Applied to the resolved config
    before it reaches loggers, checkpoints and results, where an `${oc.env:...}` would otherwise land."""
    secrets = [v for k, v in os.environ.items() if SECRET_NAME.search(k) and len(v) >= 8]

    def clean(v: Any) -> Any:
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, list):
            return [clean(x) for x in v]
        if isinstance(v, str):
            for secret in secrets:
                v = v.replace(secret, "***")
        return v

    return clean(value)


def build_model(cfg: DictConfig, backbone: PreTrainedModel) -> RewardModel:
    """The LightningModule from `cfg.model` and its groups (loss, optimizer, scheduler, freeze)."""
    model = instantiate(
        cfg.model,
        backbone=backbone,
        loss=instantiate(cfg.loss),
        optimizer=instantiate(cfg.optimizer),
        scheduler=instantiate(cfg.scheduler),
        freeze=instantiate(cfg.freeze),
    )
    model.run_config = redact(OmegaConf.to_container(cfg, resolve=True))
    return model


def build_trainer(cfg: DictConfig, **kwargs: Any) -> L.Trainer:
    """`cfg.trainer` as a Trainer; `skip_nonfinite` is rewardlab's (read by the model), not Lightning's."""
    options = OmegaConf.to_container(cfg.trainer, resolve=True)
    options.pop("skip_nonfinite")
    return instantiate(options, **kwargs)


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


def build(cfg: DictConfig) -> tuple[PreferenceDataModule, RewardModel]:
    """The data and the model, from `cfg.backbone`, `cfg.data`, `cfg.model` and its groups."""
    backbone = instantiate(cfg.backbone)
    return instantiate(cfg.data, tokenizer=backbone.tokenizer), build_model(cfg, backbone.model)


def load_run(ckpt_path: str) -> tuple[DictConfig, RewardModel, PreTrainedTokenizerBase]:
    """A trained model from a checkpoint alone: rebuilt from the config it carries, then its weights
    loaded (`weights_only`, so a checkpoint cannot run code). Returns (run config, model in eval
    mode, tokenizer)."""
    path = Path(ckpt_path)
    if not path.is_file():
        raise FileNotFoundError(f"ckpt_path: no such checkpoint {ckpt_path!r}")
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    if "rewardlab_config" not in checkpoint:
        raise ValueError(f"{ckpt_path}: not a rewardlab checkpoint (no 'rewardlab_config' in it)")
    cfg = OmegaConf.create(checkpoint["rewardlab_config"])
    backbone = instantiate(cfg.backbone)
    model = build_model(cfg, backbone.model)
    model.load_state_dict(checkpoint["state_dict"])
    ensure_pad_token(backbone.tokenizer)
    return cfg, model.eval(), backbone.tokenizer


def fit_and_test(
    cfg: DictConfig, trainer: L.Trainer, datamodule: PreferenceDataModule, model: RewardModel
) -> dict[str, Any]:
    """Fit, then test the best checkpoint when there is a test split; the metrics of both."""
    trainer.fit(model, datamodule=datamodule, ckpt_path=resume_path(cfg))
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


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    try:
        results = train(cfg)
    finally:  # Lightning's objects refer to each other in cycles: free this job's model, optimizer state,
        gc.collect()  # data maps and open files now, not with the next multirun job already loaded
    metric = cfg.get("optimized_metric")
    return results.get(metric) if metric else None


if __name__ == "__main__":
    main()
