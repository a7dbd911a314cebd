"""A run folder belongs to one run: it is claimed with a lock before anything is written into it,
a finished run's results are never overwritten, and two processes never mix their files in it.

Hydra's own `.hydra/` files are written here, after the claim (`hydra.output_subdir` is null in
`conf/hydra/default.yaml`, so Hydra does not write them first), with secrets redacted.
"""

from __future__ import annotations

import fcntl
import logging
import os
import socket
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from rewardlab.errors import UserError
from rewardlab.redaction import redact

log = logging.getLogger(__name__)

LOCK_FILE = ".rewardlab.lock"


class RunFolderError(UserError, RuntimeError):
    """This run may not write into the folder it was given; the message says why and what to do."""


class RunFolder:
    """An output folder held by this process until `release` (or the process's end, even a crash:
    the lock is the kernel's `flock`, so a killed run leaves a stale lock file, never a held one)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._fd: int | None = None

    def claim(self) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise RunFolderError(
                f"{self.path} is in use by {holder}; two runs never share a folder: wait for it to finish "
                "or choose another hydra.run.dir"
            ) from None
        previous = os.pread(fd, 200, 0).decode(errors="replace").strip()
        if previous:
            log.info("%s: took over a stale lock (its holder, %s, is gone)", self.path, previous)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} since {time.ctime()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.ftruncate(self._fd, 0)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def earlier_run(self, results: str | None) -> str | None:
        """What an earlier run left here (its results, checkpoints or config), or None for a fresh folder."""
        for name in ([results] if results else []) + ["checkpoints", ".hydra/config.yaml"]:
            if (self.path / name).exists():
                return name
        return None

    def write_hydra_files(self, task: DictConfig, hydra: DictConfig) -> None:
        """Hydra's `.hydra/config.yaml`, `hydra.yaml` and `overrides.yaml`, as Hydra writes them (the
        config unresolved), with secret values redacted (a token typed as an override stays out)."""
        folder = self.path / ".hydra"
        folder.mkdir(exist_ok=True)
        files: dict[str, Any] = {
            "config.yaml": OmegaConf.to_container(task, resolve=False),
            "hydra.yaml": {"hydra": OmegaConf.to_container(hydra.hydra, resolve=False, enum_to_str=True)},
            "overrides.yaml": OmegaConf.to_container(hydra.hydra.overrides.task, resolve=False),
        }
        for name, content in files.items():
            (folder / name).write_text(yaml.safe_dump(redact(content), sort_keys=False, allow_unicode=True))


def launched_as_rank_zero() -> bool:
    """Whether this process is the first of its run, judged from the launcher's environment before
    Lightning starts (torchrun's RANK, Lightning's LOCAL_RANK/NODE_RANK for the processes it starts,
    SLURM's SLURM_PROCID): one process holds the folder for all."""
    return not any(os.environ.get(v, "0") not in ("", "0") for v in ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID"))


@contextmanager
def claimed(task: DictConfig, results: str | None, resuming: bool = False) -> Iterator[bool]:
    """Hold `task.paths.output_dir` for this command. Yields True when it holds a finished run that
    this command resumes (nothing to do: its results stay as they are), else False. A folder that
    holds an earlier run (results, checkpoints or a config) is refused unless this command resumes
    that very run (`resuming`: its checkpoint is in this folder)."""
    if not launched_as_rank_zero():  # the other processes of a distributed run follow rank 0's claim
        yield False
        return
    folder = RunFolder(task.paths.output_dir)
    folder.claim()
    try:
        earlier = folder.earlier_run(results)
        if earlier is not None and earlier == results and resuming:
            log.info("%s holds a finished run (%s): nothing to do, its results stay as they are", folder.path, results)
            yield True
            return
        if earlier is not None and not resuming:
            raise RunFolderError(
                f"{folder.path} already holds a run ({earlier}); a run never overwrites another: "
                "choose another hydra.run.dir" + (", or resume it with ckpt_path=last" if results else "")
            )
        if HydraConfig.initialized():
            folder.write_hydra_files(task, HydraConfig.instance().cfg)
        yield False
    finally:
        folder.release()


class FreshSweepFolder(Callback):
    """A multirun never writes into a sweep folder that holds another sweep: checked before Hydra
    writes its `multirun.yaml` there (the jobs' own folders are then each claimed as above). Hydra
    turns a callback's exceptions into warnings, so the refusal is an exit."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        folder = Path(config.hydra.sweep.dir)
        if folder.is_dir() and any(folder.iterdir()):
            raise SystemExit(
                f"error: {folder} already holds a sweep; a sweep never writes into another's folder: "
                "choose another hydra.sweep.dir"
            )


@contextmanager
def atomic_output(out: Path) -> Iterator[Path]:
    """A temporary name beside `out`, renamed to it only when the block completes: a crash or an
    error leaves no half file and the old one, if any, untouched; a link at `out` is replaced, never
    written through."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        yield tmp
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
