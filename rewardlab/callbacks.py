"""Run bookkeeping that is not the model's business: checkpoint writing, preemption, final validation,
training throughput and memory."""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.exceptions import SIGTERMException

from rewardlab.disk import save_failed

log = logging.getLogger(__name__)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints written to a temporary file beside the target, flushed to disk, then renamed over
    it: a kill during saving leaves the previous checkpoint intact, never a torn one. Streams to the
    file, where Lightning's default first serialises the whole checkpoint into memory (twice)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any = None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except (OSError, RuntimeError) as e:  # torch reports a short write as "unexpected pos", without errno
            error = save_failed(e, path, tmp.stat().st_size if tmp.exists() else 0)
            if error is None:
                raise
            raise error from e
        finally:
            tmp.unlink(missing_ok=True)
        for stale in path.parent.glob(f".{path.name}.*.tmp"):  # left by a writer killed mid-save
            stale.unlink(missing_ok=True)


class CheckpointOnPreemption(Callback):
    """On SIGTERM (a cluster preempting or requeueing the job), save `<dirpath>/last.ckpt` once the
    running batch is done, so `ckpt_path=last` (or the path) resumes exactly there.

    Lightning turns SIGTERM into a `SIGTERMException` after the current batch; this saves on that
    exception only. A crash or a NaN is no state to resume from, so other exceptions save nothing.
    """

    def __init__(self, dirpath: str) -> None:
        self.path = Path(dirpath) / "last.ckpt"

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if isinstance(exception, SIGTERMException) and trainer.state.fn == "fit":
            trainer.save_checkpoint(self.path)
            log.warning("SIGTERM: saved %s at step %d", self.path, trainer.global_step)


class Throughput(Callback):
    """Pairs/s, real (non-pad) tokens/s and padding efficiency (real among the tokens the passes
    processed) of training, across all devices, and pairs/s of testing (scoring without gradients).

    The clock runs from the start of each training epoch to its end and is paused while
    validation runs, so data loading counts and evaluation does not.
    """

    def __init__(self) -> None:
        self.pairs = self.real_tokens = self.processed_real = self.padded_tokens = self.attended = 0
        self.seconds = 0.0
        self.epoch_seconds: list[float] = []  # training time of each epoch
        self.test_pairs, self.test_seconds = 0, 0.0
        self._started: float | None = None
        self._epoch_from = 0.0

    def _start(self) -> None:
        self._started = time.perf_counter()

    def _stop(self) -> None:
        if self._started is not None:
            self.seconds += time.perf_counter() - self._started
            self._started = None
            self.epoch_seconds[-1] = self.seconds - self._epoch_from

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._epoch_from = self.seconds
        self.epoch_seconds.append(0.0)
        self._start()

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: dict[str, Any], batch_idx: int
    ) -> None:
        if self._started is None:  # resumed mid-epoch: Lightning does not start that epoch again
            self.on_train_epoch_start(trainer, pl_module)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._stop()

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._stop()

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._start()

    def on_test_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.test_pairs, self._test_started = 0, time.perf_counter()

    def on_test_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: dict[str, Any],
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self.test_pairs += batch["attention_mask"].shape[0] // 2 * trainer.world_size

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.test_seconds = time.perf_counter() - self._test_started

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: dict[str, Any], batch_idx: int
    ) -> None:
        mask = batch["attention_mask"]
        world = trainer.world_size
        self.pairs += mask.shape[0] // 2 * world
        self.real_tokens += int(mask.sum()) * world
        self.padded_tokens += int(batch["padded_tokens"]) * world  # what the passes processed
        self.processed_real += int(batch.get("processed_real_tokens", mask.sum())) * world  # a shared prompt once
        self.attended += int(mask.sum(1).square().sum()) * world  # Σ length², for attention FLOPs

    def results(self) -> dict[str, float]:
        seconds = max(self.seconds, 1e-9)
        return {
            "train/pairs_per_s": self.pairs / seconds,
            "train/tokens_per_s": self.real_tokens / seconds,
            "train/padding_efficiency": self.processed_real / max(self.padded_tokens, 1),
            "train/tokens": self.real_tokens,
            "train/token_pairs_attended": self.attended,
            "train/seconds": self.seconds,
            "train/epoch_seconds": [round(s, 3) for s in self.epoch_seconds],
        } | ({"test/pairs_per_s": self.test_pairs / max(self.test_seconds, 1e-9)} if self.test_seconds else {})


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


class TrimMemory(Callback):
    """Hand freed memory back to the OS before validation and testing (glibc's `malloc_trim`).

    Training with varying batch shapes leaves freed blocks in the allocator; evaluation allocates
    other shapes and would grow the process on top of them. Trimming at those points keeps peak
    memory at what training itself needs. A no-op where the C library has no `malloc_trim`.
    """

    def __init__(self) -> None:
        name = ctypes.util.find_library("c")
        libc = ctypes.CDLL(name) if name else None
        self._trim = getattr(libc, "malloc_trim", None)

    def _release(self) -> None:
        if self._trim is not None:
            self._trim(0)

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._release()

    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._release()
