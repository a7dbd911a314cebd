"""Train a reward model: `python -m rewardlab.train [group=option ...] [key=value ...]`.

Builds everything from `conf/train.yaml` with `hydra.utils.instantiate`, fits, tests when a test
split exists, and writes `results.json` into the run folder. Console script: `rewardlab-train`.
"""

from __future__ import annotations

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
from lightning.pytorch.loggers import Logger, WandbLogger
from omegaconf import DictConfig, OmegaConf
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from rewardlab.callbacks import Throughput
from rewardlab.data import DataError, PreferenceDataModule, ensure_pad_token
from rewardlab.model import RewardModel

log = logging.getLogger(__name__)


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
    model.run_config = OmegaConf.to_container(cfg, resolve=True)
    return model


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
    trainer.fit(model, datamodule=datamodule, ckpt_path=cfg.ckpt_path)
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
        loggers = [instantiate(c) for c in (cfg.logger or {}).values() if c is not None]
        trainer: L.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
        params = count_parameters(model)
        log.info("parameters: %d total, %d trainable", params["params/total"], params["params/trainable"])
        for lg in trainer.loggers:
            lg.log_hyperparams({**model.run_config, **params})
        results = fit_and_test(cfg, trainer, datamodule, model)
        for callback in callbacks:
            if isinstance(callback, Throughput):
                results |= callback.results()
        results |= params | {
            "global_step": trainer.global_step,
            "peak_rss_mb": peak_rss_mb(),
            "wall_s": time.time() - started,
        }
        if trainer.is_global_zero:
            numbers = {k: v for k, v in results.items() if isinstance(v, (int, float))}
            for lg in trainer.loggers:
                lg.log_metrics(numbers, step=trainer.global_step)
            path = Path(cfg.paths.output_dir) / "results.json"
            path.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
            log.info("results: %s", path)
    except BaseException as e:
        log.error("run failed: %s: %s", type(e).__name__, e, exc_info=not isinstance(e, DataError))
        finish_loggers(loggers, exit_code=1)
        raise
    finish_loggers(loggers, exit_code=0)
    return results


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    results = train(cfg)
    metric = cfg.get("optimized_metric")
    return results.get(metric) if metric else None


if __name__ == "__main__":
    main()
