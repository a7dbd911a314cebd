"""Room for checkpoints: a disk that cannot hold them is named before the first checkpoint is written,
and a save that runs out of space or quota says so in one line instead of torch's "unexpected pos"."""

from __future__ import annotations

import errno
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, SingleDeviceStrategy

from rewardlab.errors import UserError

log = logging.getLogger(__name__)

FULL_BELOW = 16 * 2**20  # a write that failed with less than this free on its disk failed for want of room
ROOM = "free space, or write the run to another disk (hydra.run.dir / hydra.sweep.dir)"
WEIGHTS_ONLY = (
    "save weights only (callbacks.model_checkpoint.save_weights_only=true callbacks.last_checkpoint=null; "
    "such checkpoints cannot resume)"
)
FEWER_TOP = "keep fewer best (callbacks.model_checkpoint.save_top_k=1)"
NO_LAST = "keep no last.ckpt (callbacks.model_checkpoint.save_last=false callbacks.last_checkpoint=null)"


class DiskSpaceError(UserError):
    """The checkpoint folder's disk cannot hold the run's checkpoints."""


def size_text(n: float) -> str:
    """Bytes as 512 B, 3.4 MB, 1.62 GB (powers of 1000, as `df -H` and file managers count)."""
    for unit in ("B", "kB", "MB", "GB", "TB"):
        text = f"{n:.0f}" if unit == "B" else f"{n:.3g}"
        if abs(float(text)) < 1000 or unit == "TB":
            return f"{text} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


def existing(folder: Path) -> Path:
    """`folder`, or before it exists, its nearest existing parent (where its files will take room)."""
    folder = folder.absolute()
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return folder


def free_bytes(folder: Path) -> int:
    """Free bytes on the disk that holds `folder`."""
    return shutil.disk_usage(existing(folder)).free


def out_of_room(error: BaseException) -> bool:
    """Whether a disk-full or quota error (ENOSPC, EDQUOT) caused `error`: torch reports a short write
    as a RuntimeError with the OSError only in its context."""
    seen: set[int] = set()
    cause: BaseException | None = error
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if isinstance(cause, OSError) and cause.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        cause = cause.__cause__ or cause.__context__
    return False


def save_failed(error: BaseException, path: Path, written: int) -> DiskSpaceError | None:
    """The one-line error for a checkpoint save that ran out of space or quota; None for other failures
    on a disk with room left (they keep their own error)."""
    free = free_bytes(path.parent)
    room = f"{size_text(free)} free on its disk after {size_text(written)} of it was written"
    if out_of_room(error):
        why = f"out of disk space or quota ({room}; {type(error).__name__}: {error})"
    elif free < FULL_BELOW:
        why = f"{type(error).__name__}: {error} ({room}: likely out of disk space or quota)"
    else:
        return None
    return DiskSpaceError(f"could not write checkpoint {path}: {why}; earlier checkpoints are intact; {ROOM}")


def state_bytes(state: Any) -> int:
    """Bytes of the tensors in a nested state, each storage once (as `torch.save` writes it)."""
    storages: dict[int, int] = {}
    stack = [state]
    while stack:
        item = stack.pop()
        if isinstance(item, torch.Tensor):
            storage = item.untyped_storage()
            storages.setdefault(storage.data_ptr() or id(storage), storage.nbytes())
        elif isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
    return sum(storages.values())


def checkpoint_bytes(module: torch.nn.Module, optimizers: list[torch.optim.Optimizer]) -> tuple[int, int]:
    """About the size of one checkpoint, weights only and with the optimizers' state (which exists from
    their first step); the rest is small."""
    weights = module.state_dict()
    return state_bytes(weights), state_bytes([weights, *(list(o.state.values()) for o in optimizers)])


@dataclass
class Folder:
    """The checkpoints one folder holds at once: `kept` files of up to `size` bytes each (at least one
    more with `unbounded`, save_top_k=-1, which keeps every one), and `present` bytes of checkpoints a
    resumed run finds there and replaces. What the callbacks are set to (`full`: some write the optimizer
    state; `top`: the most best ones kept; `last`: a last.ckpt) decides which fixes are offered."""

    path: Path
    size: int = 0
    kept: int = 0
    unbounded: bool = False
    present: int = 0
    full: bool = False
    top: int = 0
    last: bool = False


def planned(callbacks: list[ModelCheckpoint], weights: int, full: int) -> list[Folder]:
    """Each checkpoint folder and what its callbacks keep there: `save_top_k` files (every one for -1)
    and one last.ckpt per folder, unless `save_last="link"` points it at a top-k file."""
    folders: dict[Path, Folder] = {}
    for callback in callbacks:
        top = callback.save_top_k
        if top == 0 and not callback.save_last:
            continue
        path = Path(callback.dirpath).absolute()
        folder = folders.setdefault(path, Folder(path))
        folder.size = max(folder.size, weights if callback.save_weights_only else full)
        folder.full |= not callback.save_weights_only
        folder.unbounded |= top < 0
        folder.top = max(folder.top, top)
        folder.kept += 1 if top < 0 else top
        if callback.save_last and not (callback.save_last == "link" and top != 0) and not folder.last:
            folder.last = True
            folder.kept += 1
    for folder in folders.values():
        if folder.path.is_dir() and not folder.unbounded:  # save_top_k=-1 replaces none of them
            replaced = [f for f in folder.path.glob("*.ckpt") if f.name != "best.ckpt" and not f.is_symlink()]
            folder.present = sum(f.stat().st_size for f in replaced if f.is_file())
    return [f for f in folders.values() if f.size]


def fixes(group: list[Folder], refused: bool) -> str:
    """What would let the run fit, leaving out what its settings already do; keeping fewer checkpoints
    cannot help a disk that cannot hold one."""
    fewer = [FEWER_TOP] * any(f.unbounded or f.top > 1 for f in group) + [NO_LAST] * any(f.last for f in group)
    return "; or ".join([ROOM] + [WEIGHTS_ONLY] * any(f.full for f in group) + fewer * (not refused))


def check(folders: list[Folder]) -> str | None:
    """The error if a disk cannot hold one checkpoint of its folders; warns if it cannot hold what they
    keep at once plus the file written beside them, less the checkpoints already there that the run
    replaces."""
    disks: dict[int, list[Folder]] = {}
    for folder in folders:
        disks.setdefault(os.stat(existing(folder.path)).st_dev, []).append(folder)
    for group in disks.values():
        names = ", ".join(str(f.path) for f in group)
        free, largest = free_bytes(group[0].path), max(group, key=lambda f: f.size)
        sizes = f"one checkpoint of this run is {size_text(largest.size)}, and its disk has {size_text(free)} free"
        if free < largest.size:
            return f"checkpoints: {names}: {sizes}; {fixes(group, refused=True)}"
        peak = sum(f.kept * f.size for f in group) + largest.size
        present = min(sum(f.present for f in group), peak - largest.size)
        if free < peak - present:
            kept = sum(f.kept for f in group)
            every = " (and every best one: save_top_k=-1)" if any(f.unbounded for f in group) else ""
            there = f", less {size_text(present)} of them already there" if present else ""
            log.warning(
                "checkpoints: %s: %s; the run keeps %d checkpoints at once%s and writes the next beside them: "
                "%s%s; it may run out of room. To fit: %s",
                names, sizes, kept, every, size_text(peak), there, fixes(group, refused=False),
            )  # fmt: skip
    return None


class DiskSpace(Callback):
    """Room for the checkpoints, checked after the first optimizer step (the first point where the size
    of a checkpoint is known, and before any is written): a disk that cannot hold one checkpoint stops
    the run there, with the sizes; one that cannot hold what the run keeps at once, plus the file being
    written beside them, is warned of. A run that fills its disk later fails at that save with
    `DiskSpaceError` and keeps its earlier checkpoints. Sharded strategies (FSDP, DeepSpeed) are not
    checked: one rank cannot size their checkpoints without the others."""

    def __init__(self) -> None:
        self.checked = False

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: dict[str, Any], batch_idx: int
    ) -> None:
        if self.checked or trainer.global_step < 1:
            return
        self.checked = True
        strategy = trainer.strategy
        if isinstance(strategy, DeepSpeedStrategy) or not isinstance(strategy, (SingleDeviceStrategy, DDPStrategy)):
            log.info(
                "checkpoints: disk space not checked under %s (only single-device and DDP runs are)",
                type(strategy).__name__,
            )
            return
        callbacks = [c for c in trainer.checkpoint_callbacks if isinstance(c, ModelCheckpoint) and c.dirpath]
        problem = None
        if trainer.is_global_zero and callbacks:  # the rank that writes checkpoints
            try:
                problem = check(planned(callbacks, *checkpoint_bytes(pl_module, trainer.optimizers)))
            except Exception as e:  # a check that cannot size the run must not stop it, nor leave ranks waiting
                log.warning("checkpoints: disk space not checked: %s: %s", type(e).__name__, e)
        problem = strategy.broadcast(problem, src=0)  # every rank stops, or none
        if problem:
            raise DiskSpaceError(problem)
