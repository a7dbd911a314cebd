"""Secrets never reach run files: values that look secret are replaced by `***` before a config,
an override list or a command line is written anywhere (loggers, checkpoints, results, `.hydra/`).

A value is secret when it is the value of an environment variable whose name looks secret
(`*TOKEN*`, `*SECRET*`, `*PASSWORD*`, `*PRIVATE*`, `*_KEY`, `*CREDENTIAL*`, ...) or whose value
looks like a credential (`hf_...`, `sk-...`, `ghp_...`, AWS key ids, JWTs, private key blocks),
whatever its length; when it looks like a credential itself; or when a config key or an override
names it (`token`, `password`, `api_key`, ...).
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

MASK = "***"
SECRET_NAME = re.compile(
    r"TOKEN(?!IZER)|SECRET|PASSW(OR)?D|PASSPHRASE|PRIVATE|CREDENTIAL|API_?KEY|ACCESS_?KEY|AUTH|COOKIE|"
    r"(^|_)KEYS?($|_)|_PAT($|_)|_PWD($|_)",
    re.IGNORECASE,
)
SECRET_WORDS = (
    r"secret[_-]?key|secret|token|password|passwd|pass|pwd|pin|passphrase|api[_-]?key|access[_-]?key|"
    r"private[_-]?key|credentials?|auth|cookie"
)
SECRET_KEY = re.compile(rf"(^|[_.-])({SECRET_WORDS})$", re.IGNORECASE)
# `password: x` or `db_token=x` inside a longer text (a dict-valued override, a tag, override_dirname)
INLINE_SECRET = re.compile(
    rf"(?<![A-Za-z0-9])((?:[A-Za-z0-9]+[_.-])*(?:{SECRET_WORDS}))(\s*[:=]\s*)([^\s,}}\]'\"]+)", re.IGNORECASE
)
SECRET_VALUE = re.compile(
    r"hf_[A-Za-z0-9]{16,}|sk-[A-Za-z0-9_\-]{16,}|gh[pousr]_[A-Za-z0-9]{20,}|github_pat_\w{20,}|"
    r"xox[abposr]-[\w-]{10,}|(AKIA|ASIA)[0-9A-Z]{16}|AIza[\w-]{30,}|eyJ[\w-]{8,}\.[\w-]{8,}\.[\w-]{8,}|"
    r"-----BEGIN [A-Z ]*PRIVATE KEY-----[^-]*(-----END [A-Z ]*PRIVATE KEY-----)?|(?<=://)[^/@\s:]+:[^/@\s]+(?=@)"
)
NOT_SECRET = {"", "0", "1", "true", "false", "yes", "no", "on", "off", "none", "null"}
OVERRIDE = re.compile(r"^([+~]{0,2}[\w.\-/]+)=(.*)$", re.DOTALL)


def environment_secrets() -> list[str]:
    """Values of environment variables that look secret by name or by value, longest first."""
    found = {
        value
        for name, value in os.environ.items()
        if value.strip().lower() not in NOT_SECRET and (SECRET_NAME.search(name) or SECRET_VALUE.search(value))
    }
    return sorted(found, key=len, reverse=True)


def _mask_text(text: str, secrets: list[str]) -> str:
    for secret in secrets:
        if len(secret) >= 8:
            text = text.replace(secret, MASK)
        else:  # a short value only where it stands alone, not inside another word or number
            text = re.sub(rf"(?<![A-Za-z0-9]){re.escape(secret)}(?![A-Za-z0-9])", MASK, text)
    text = SECRET_VALUE.sub(MASK, text)
    override = OVERRIDE.match(text)
    if override and SECRET_KEY.search(override.group(1).lstrip("+~")) and override.group(2):
        return f"{override.group(1)}={MASK}"
    return INLINE_SECRET.sub(lambda m: f"{m.group(1)}{m.group(2)}{MASK}", text)


def redact(value: Any, secrets: list[str] | None = None) -> Any:
    """`value` (a config, a list of overrides, a string) with every secret replaced by `***`."""
    secrets = environment_secrets() if secrets is None else secrets

    values = set(secrets)

    def clean(v: Any, key: str = "") -> Any:
        if SECRET_KEY.search(key) and v not in (None, "", [], {}) and not isinstance(v, bool):
            return MASK  # whatever a key named like a secret holds: text, a number, a list, a mapping
        if isinstance(v, dict):
            return {k: clean(x, str(k)) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        if isinstance(v, str):
            return _mask_text(v, secrets)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and str(v) in values:
            return MASK
        return v

    return clean(value)


@contextmanager
def redacted_argv() -> Iterator[None]:
    """`sys.argv` with secrets masked, for libraries that record the command line (wandb does)."""
    saved = sys.argv
    sys.argv = redact(list(saved))
    try:
        yield
    finally:
        sys.argv = saved
