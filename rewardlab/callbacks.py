"""Run bookkeeping that is not the model's business: checkpoint writing and the room for it,
preemption, final validation, training throughput and memory."""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.exceptions import SIGTERMException

from rewardlab.errors import UserError

log = logging.getLogger(__name__)

FULL_BELOW = 16 * 2**20  # a write that failed with less than this free on its disk failed for want of room


class DiskSpaceError(UserError):
    """The checkpoint folder's disk cannot hold the run's checkpoints."""


def size_text(n: float) -> str:
    """Bytes as 512 B, 3.4 MB, 1.62 GB (powers of 1000, as `df -H` and file managers count)."""
    for unit in ("B", "kB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.3g} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


def free_bytes(folder: Path) -> int:
    """Free bytes on the disk that holds `folder` (or, before it exists, its nearest existing parent)."""
    folder = folder.absolute()
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return shutil.disk_usage(folder).free


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
            free = free_bytes(path.parent)
            if getattr(e, "errno", None) not in (errno.ENOSPC, errno.EDQUOT) and free >= FULL_BELOW:
                raise
            written = tmp.stat().st_size if tmp.exists() else 0
            raise DiskSpaceError(
                f"could not write checkpoint {path}: out of disk space or quota ({size_text(free)} free on its "
                f"disk after {size_text(written)} of it was written); the previous {path.name}, if any, is intact. "
                "Free space, or write the run to another disk (hydra.run.dir / hydra.sweep.dir)"
            ) from e
        finally:
            tmp.unlink(missing_ok=True)
        for stale in path.parent.glob(f".{path.name}.*.tmp"):  # left by a writer killed mid-save
            stale.unlink(missing_ok=True)


def state_bytes(state: Any, seen: dict[int, int] | None = None) -> int:
    """Bytes of the tensors in a nested state, each storage once (as `torch.save` writes it)."""
    seen = {} if seen is None else seen
    if isinstance(state, torch.Tensor):
        storage = state.untyped_storage()
        seen.setdefault(storage.data_ptr() or id(storage), storage.nbytes())
    elif isinstance(state, dict):
        for value in state.values():
            state_bytes(value, seen)
    elif isinstance(state, (list, tuple)):
        for value in state:
            state_bytes(value, seen)
    return sum(seen.values())


def checkpoint_bytes(module: torch.nn.Module, optimizers: list[torch.optim.Optimizer]) -> int:
    """About the size of one checkpoint: the weights and the optimizers' state (which exists from their
    first step), the rest being small."""
    seen: dict[int, int] = {}
    state_bytes(module.state_dict(), seen)
    for optimizer in optimizers:
        state_bytes(optimizer.state_dict()["state"], seen)
    return sum(seen.values())


def kept_checkpoints(trainer: L.Trainer) -> int:
    """Checkpoint files the run keeps at once: each callback's `save_top_k` (all of them, -1, counted as
    one) and one `last.ckpt`."""
    callbacks = trainer.checkpoint_callbacks
    top = sum(1 if c.save_top_k < 0 else c.save_top_k for c in callbacks if hasattr(c, "save_top_k"))
    return top + any(getattr(c, "save_last", False) for c in callbacks)


class DiskSpace(Callback):
    """Room for the checkpoints, checked after the first optimizer step (the first point where the size
    of a checkpoint is known, and before any is written): a disk that cannot hold one checkpoint stops
    the run there, with the sizes; one that cannot hold what the run keeps at once, plus the file being
    written beside them, is warned of. A run that fills its disk later fails at that save with
    `DiskSpaceError` and keeps its previous checkpoint."""

    def __init__(self, dirpath: str) -> None:
        self.dirpath = Path(dirpath)
        self.checked = False

    def check(self, size: int, kept: int) -> str | None:
        """The error, if the disk cannot hold one checkpoint of `size` bytes; warns if it cannot hold
        `kept` of them and one more."""
        free, peak = free_bytes(self.dirpath), size * (kept + 1)
        sizes = f"one checkpoint of this run is {size_text(size)}, and its disk has {size_text(free)} free"
        fixes = (
            "free space, write the run to another disk (hydra.run.dir / hydra.sweep.dir), or keep fewer "
            "checkpoints (callbacks.model_checkpoint.save_top_k, callbacks.last_checkpoint=null)"
        )
        if free < size:
            return f"checkpoints: {self.dirpath}: {sizes}; {fixes}"
        if free < peak:
            log.warning(
                "checkpoints: %s: %s; the run keeps %d at once and writes the next beside them (%s): "
                "it may run out of room; %s",
                self.dirpath, sizes, kept, size_text(peak), fixes,
            )  # fmt: skip
        return None

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: dict[str, Any], batch_idx: int
    ) -> None:
        if self.checked or trainer.global_step < 1 or not trainer.checkpoint_callbacks:
            return
        self.checked = True
        problem = None
        if trainer.is_global_zero:  # the rank that writes checkpoints
            problem = self.check(checkpoint_bytes(pl_module, trainer.optimizers), kept_checkpoints(trainer))
        problem = trainer.strategy.broadcast(problem, src=0)  # every rank stops, or none
        if problem:
            raise DiskSpaceError(problem)


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
