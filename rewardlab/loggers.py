"""Logger factories that need a decision at run time."""

from __future__ import annotations

import netrc
import os
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import WandbLogger

from rewardlab.redaction import redacted_argv


class RedactedWandbLogger(WandbLogger):
    """wandb records the command line in each run's metadata: it sees it with secrets masked."""

    @property
    def experiment(self) -> Any:
        if self._experiment is not None:
            return super().experiment
        with redacted_argv():  # the run starts now
            return super().experiment


def has_wandb_credentials() -> bool:
    """True when `wandb login` was run (an api.wandb.ai entry in ~/.netrc) or WANDB_API_KEY is set."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        return False


def wandb(
    save_dir: str,
    project: str,
    entity: str | None,
    group: str | None,
    job_type: str | None,
    tags: list[str],
    name: str | None,
    mode: str,
) -> WandbLogger:
    """A WandbLogger that needs no account and no network.

    `mode: auto` logs online when the user is logged in (or WANDB_API_KEY is set) and offline
    otherwise, with the run's files under `save_dir/wandb` (upload later with `wandb sync`).
    A WANDB_MODE environment variable, when set, wins.
    """
    if mode not in ("auto", "online", "offline", "disabled"):
        raise ValueError(f"logger.wandb.mode: unknown {mode!r}; expected auto, online, offline or disabled")
    mode = os.environ.get("WANDB_MODE") or (
        ("online" if has_wandb_credentials() else "offline") if mode == "auto" else mode
    )
    Path(save_dir).mkdir(parents=True, exist_ok=True)
    return RedactedWandbLogger(
        save_dir=save_dir,
        project=project,
        entity=entity,
        group=group,
        job_type=job_type,
        tags=list(tags),
        name=name,
        offline=mode == "offline",
        mode=mode,
    )
