"""What ends a command with one line instead of a traceback: input the user can fix."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf.errors import InterpolationResolutionError


class UserError(Exception):
    """Bad input (a file, a row, a setting, a checkpoint, a folder); the message names it and says what
    was expected. The classes of each step derive from it (DataError, ConfigError, ...)."""


def _one_line(e: Exception) -> str:
    """The message of a user error; for a `${...}` that does not resolve, `<key>: <why>` from OmegaConf's
    several lines."""
    if not isinstance(e, InterpolationResolutionError):
        return str(e)
    lines = str(e).splitlines()
    where = next((x.split(":", 1)[1].strip() for x in lines if x.strip().startswith("full_key:")), "settings")
    return f"{where}: {lines[0].split('resolving interpolation: ')[-1]}"


def one_line_errors(task: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """A command's task that, in a single run, ends on a `UserError` (or a missing or existing file, or a
    `${...}` in the settings that does not resolve) with `error: <message>` and exit status 1; in a
    multirun the error is the job's, as Hydra reports it."""

    @functools.wraps(task)
    def run(cfg: Any) -> Any:
        try:
            return task(cfg)
        except (UserError, FileExistsError, FileNotFoundError, InterpolationResolutionError) as e:
            if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
                raise
            from rewardlab.redaction import redact

            print(f"error: {redact(_one_line(e))}", file=sys.stderr)
            raise SystemExit(1) from None

    return run
