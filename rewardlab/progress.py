"""Progress a user can follow anywhere: Rich's bar in a terminal; elsewhere (SLURM, `> log`) plain
log lines at a fixed interval, which also land in the run's `train.log`. Every validation writes
one line either way."""

from __future__ import annotations

import logging
import math
import sys
import time
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback, ProgressBar, RichProgressBar

log = logging.getLogger("rewardlab.progress")


def progress_bar(style: str, interval_s: float) -> ProgressBar:
    """`style`: rich (the bar), plain (log lines every `interval_s` seconds), or auto: rich when
    standard output is a terminal, else plain."""
    if style not in ("auto", "rich", "plain"):
        raise ValueError(f"callbacks.progress_bar.style: expected auto, rich or plain, got {style!r}")
    if not (isinstance(interval_s, (int, float)) and 0 < interval_s < math.inf):
        raise ValueError(f"callbacks.progress_bar.interval_s: expected seconds > 0, got {interval_s!r}")
    if style == "rich" or (style == "auto" and sys.stdout.isatty()):
        return RichProgressBar()
    return PlainProgress(interval_s)


def duration(seconds: float) -> str:
    """12s, 3m05s, 2h07m."""
    seconds = max(0, int(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class PlainProgress(ProgressBar):
    """One log line every `interval_s` seconds of training (and at its last step): step of total, epoch,
    loss and accuracy averaged since the previous line, pairs/s over that span, and the time left."""

    def __init__(self, interval_s: float) -> None:
        super().__init__()
        self.interval_s = interval_s
        self.enabled = True
        self._reset_span()
        self._started = self._span_started = 0.0
        self._first_step = 0

    def disable(self) -> None:
        self.enabled = False

    def enable(self) -> None:
        self.enabled = True

    def _reset_span(self) -> None:
        self.losses: list[float] = []
        self.accs: list[float] = []
        self.pairs = 0

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._started = self._span_started = time.perf_counter()
        self._first_step = trainer.global_step
        self._reset_span()

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: dict[str, Any], batch_idx: int
    ) -> None:
        metrics = trainer.callback_metrics
        if "train/loss_step" in metrics:
            self.losses.append(float(metrics["train/loss_step"]))
            self.accs.append(float(metrics["train/acc_step"]))
        self.pairs += batch["attention_mask"].shape[0] // 2 * trainer.world_size
        now = time.perf_counter()
        total = trainer.estimated_stepping_batches
        last = trainer.global_step >= total or trainer.should_stop
        if (now - self._span_started < self.interval_s and not last) or not self.enabled or not trainer.is_global_zero:
            return
        done = trainer.global_step - self._first_step
        left = (now - self._started) / max(done, 1) * max(total - trainer.global_step, 0)
        log.info(
            "step %d/%s epoch %d: loss %.4f acc %.3f, %.1f pairs/s, %s left",
            trainer.global_step,
            total if math.isfinite(total) else "?",
            trainer.current_epoch,
            sum(self.losses) / max(len(self.losses), 1),
            sum(self.accs) / max(len(self.accs), 1),
            self.pairs / max(now - self._span_started, 1e-9),
            duration(left) if math.isfinite(total) else "?",
        )
        self._span_started = now
        self._reset_span()


class ValidationLine(Callback):
    """After each validation (not the sanity check): `val/acc`, `val/acc_best` and `val/loss` in one line."""

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        m = trainer.callback_metrics
        if "val/acc" not in m:
            return
        log.info(
            "validation at step %d (epoch %d): val/acc %.4f, val/acc_best %.4f, val/loss %.4f",
            trainer.global_step,
            trainer.current_epoch,
            float(m["val/acc"]),
            float(m.get("val/acc_best", m["val/acc"])),
            float(m.get("val/loss", math.nan)),
        )
