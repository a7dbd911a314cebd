"""Rows: what a preference pair is, the schemas a row may follow, and the bad-row vocabulary.

`check_row` turns one raw row into a `Pair` or a `BadRow` that names where it is, which field, a
short code to count by, and why it cannot be used.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

SCHEMAS = ("explicit", "conversational", "implicit")


class DataError(ValueError):
    """Bad input found before training; the message names the file, line or row, and the field."""


@dataclass
class Pair:
    prompt: str | list[dict]
    chosen: str | list[dict]
    rejected: str | list[dict]
    margin: float
    subset: str


@dataclass
class BadRow:
    """A row that cannot be used: where it is, which field, a short `code` to count by, and why."""

    where: str
    field: str | None
    code: str
    reason: str
    row: Any

    def message(self) -> str:
        field = f" field {self.field!r}:" if self.field else ""
        return f"{self.where}:{field} {self.reason}"


def detect_schema(row: Any, columns: dict[str, str]) -> str:
    """explicit: string prompt/chosen/rejected; conversational: message lists; implicit: no prompt,
    chosen and rejected are full texts sharing the prompt as a prefix."""
    if not isinstance(row, dict):
        return "explicit"
    if isinstance(row.get(columns["chosen"]), list):
        return "conversational"
    return "explicit" if row.get(columns["prompt"]) is not None else "implicit"


def _describe(value: Any) -> str:
    return "null" if value is None else f"{type(value).__name__} {str(value)[:40]!r}"


def _messages(value: Any) -> str | None:
    """None if `value` is a non-empty list of {role, content} string messages, else what is wrong."""
    if not isinstance(value, list) or not value:
        return f"expected a non-empty list of messages, got {_describe(value)}"
    for i, m in enumerate(value):
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            return f"message {i}: expected {{'role': str, 'content': str}}, got {_describe(m)}"
    return None


def common_prefix(a: list | str, b: list | str) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def _split_implicit(chosen: str, rejected: str) -> int:
    """Where the shared prompt ends: the common prefix, backed off to the last whitespace so both
    responses start at a word boundary."""
    n = common_prefix(chosen, rejected)
    while n > 0 and not chosen[n - 1].isspace() and not (n < len(chosen) and chosen[n].isspace()):
        n -= 1
    return n


def _margin(value: Any) -> float | str:
    if value is None or value == "":
        return math.nan
    if isinstance(value, bool):
        return f"expected a number, got {_describe(value)}"
    try:
        number = float(value)
    except (TypeError, ValueError):
        return f"expected a number, got {_describe(value)}"
    return number if math.isfinite(number) else f"expected a finite number, got {value!r}"


def check_row(row: Any, where: str, schema: str, columns: dict[str, str]) -> Pair | BadRow:
    """Validate one raw row against `schema` and return a `Pair`, or a `BadRow` saying why not."""
    c = columns
    if isinstance(row, BadRow):
        return row
    if not isinstance(row, dict):
        return BadRow(
            where,
            None,
            "not_an_object",
            f"expected an object with fields {c['chosen']!r} and {c['rejected']!r}, got {_describe(row)}",
            row,
        )
    needed = ("prompt", "chosen", "rejected") if schema == "explicit" else ("chosen", "rejected")
    for key in needed:
        if c[key] not in row:
            return BadRow(
                where, c[key], "missing_field", f"missing (this {schema} dataset needs {[c[k] for k in needed]})", row
            )
    margin = _margin(row.get(c["margin"]))
    if isinstance(margin, str):
        return BadRow(where, c["margin"], "bad_margin", margin, row)
    subset = row.get(c["subset"])
    subset = "" if subset is None else str(subset)
    chosen, rejected, prompt = row[c["chosen"]], row[c["rejected"]], row.get(c["prompt"])

    if schema == "conversational":
        for key, value in (("chosen", chosen), ("rejected", rejected)):
            if (problem := _messages(value)) is not None:
                return BadRow(where, c[key], "bad_messages", problem, row)
        if prompt is None:
            n = common_prefix(chosen, rejected)
            prompt, chosen, rejected = chosen[:n], chosen[n:], rejected[n:]
            if not chosen or not rejected:
                side = "chosen" if not chosen else "rejected"
                return BadRow(
                    where,
                    c[side],
                    "empty_response",
                    "no messages left after the prompt shared with the other side",
                    row,
                )
        elif isinstance(prompt, str):
            prompt = [{"role": "user", "content": prompt}]
        elif (problem := _messages(prompt)) is not None:
            return BadRow(where, c["prompt"], "bad_messages", problem, row)
        if chosen == rejected:
            return BadRow(where, c["rejected"], "identical", "identical to chosen", row)
        for key, value in (("chosen", chosen), ("rejected", rejected)):
            if not "".join(m["content"] for m in value).strip():
                return BadRow(where, c[key], "empty_response", "empty response", row)
        return Pair(prompt, chosen, rejected, margin, subset)

    fields = (("chosen", chosen), ("rejected", rejected)) + ((("prompt", prompt),) if schema == "explicit" else ())
    for key, value in fields:
        if not isinstance(value, str):
            return BadRow(where, c[key], "not_a_string", f"expected a string, got {_describe(value)}", row)
    if schema == "implicit":
        n = _split_implicit(chosen, rejected)
        prompt, chosen, rejected = chosen[:n], chosen[n:], rejected[n:]
    for key, value in (("chosen", chosen), ("rejected", rejected)):
        if not value.strip():
            return BadRow(where, c[key], "empty_response", "empty response", row)
    if chosen == rejected:
        return BadRow(where, c["rejected"], "identical", "identical to chosen", row)
    return Pair(prompt, chosen, rejected, margin, subset)
