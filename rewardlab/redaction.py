"""Secrets never reach run files: values of secret-looking environment variables are replaced by `***`."""

from __future__ import annotations

import os
import re
from typing import Any

SECRET_NAME = re.compile(r"TOKEN|SECRET|PASSWORD|API_KEY|APIKEY|ACCESS_KEY|CREDENTIAL", re.IGNORECASE)


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
