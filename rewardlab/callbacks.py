"""Run bookkeeping that is not the model's business: final validation and training throughput."""

from __future__ import annotations

import time
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback


class Throughput(Callback):
    """Pairs/s, real (non-pad) tokens/s and padding efficiency of training, across all devices.

    The clock runs from the start of each training epoch to its end and is paused while
    validation runs, so data loading counts and evaluation does not.
    """

    def __init__(self) -> None:
        self.pairs = self.real_tokens = self.padded_tokens = 0
        self.seconds = 0.0
        self._started: float | None = None

    def _start(self) -> None:
        self._started = time.perf_counter()

    def _stop(self) -> None:
        if self._started is not None:
            self.seconds += time.perf_counter() - self._started
            self._started = None

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start()

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._stop()

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._stop()

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._start()

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: dict[str, Any], batch_idx: int
    ) -> None:
        mask = batch["attention_mask"]
        world = trainer.world_size
        self.pairs += mask.shape[0] // 2 * world
        self.real_tokens += int(mask.sum()) * world
        self.padded_tokens += mask.numel() * world

    def results(self) -> dict[str, float]:
        seconds = max(self.seconds, 1e-9)
        return {
            "train/pairs_per_s": self.pairs / seconds,
            "train/tokens_per_s": self.real_tokens / seconds,
            "train/padding_efficiency": self.real_tokens / max(self.padded_tokens, 1),
            "train/seconds": self.seconds,
        }


class ValidateOnMaxSteps(Callback):
    """Validate (and checkpoint) when `trainer.max_steps` ends training mid-epoch.

    Lightning validates at epoch ends and every `val_check_interval`; a run cut short by
    `max_steps` would otherwise end unvalidated, with no `val/acc` and no best checkpoint. Asking
    the trainer to stop at that step makes Lightning validate before stopping.
    """

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: dict[str, Any], batch_idx: int
    ) -> None:
        if 0 < trainer.max_steps <= trainer.global_step:
            trainer.should_stop = True
