"""Rows: what a preference pair is, the schemas a row may follow, and the bad-row vocabulary.

`decide_schema` reads all rows of a file to pick its schema (one odd row cannot turn a file
implicit and make every prompt vanish); `check_row` turns one raw row into a `Pair` or a `BadRow`
that names where it is, which field, a short code to count by, and why it cannot be used.
"""

from __future__ import annotations

import json
import logging
import math
import re
import reprlib
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from decimal import Decimal
from numbers import Real
from typing import Any

from rewardlab.errors import UserError

log = logging.getLogger(__name__)

SCHEMAS = ("explicit", "conversational", "implicit")
ROLES = ("system", "user", "assistant", "tool")
MAX_DEPTH = 100  # far beyond any preference row; deeper values would break json.dumps and repr later
PLAIN_NUMBER = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")


class DataError(UserError, ValueError):
    """Bad input found before training; the message names the file, line or row, and the field."""


@dataclass
class Pair:
    prompt: str | list[dict]
    chosen: str | list[dict]
    rejected: str | list[dict]
    margin: float
    subset: str
    tie: bool = False  # neither response is preferred (`data.columns.tie`); chosen/rejected is then only an order
    key: str = ""  # a pair made of a group: which responses (`groups.group_pairs`); a pair row: its row number


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


@dataclass(frozen=True)
class Unreadable:
    """A JSON number or constant Python cannot hold faithfully (NaN, 1e999, a 5000-digit integer):
    the reader keeps its text so the row becomes a bad row instead of a crash or an `inf`."""

    text: str
    reason: str

    def __str__(self) -> str:
        return self.text


class TextRow(dict):
    """A row whose values are all text, as CSV gives them: an empty margin cell means no margin."""


def describe_value(value: Any) -> str:
    """A value as error messages show it: its type and the start of its repr (`str 'abc'`, `null`)."""
    return "null" if value is None else f"{type(value).__name__} {reprlib.repr(value)[:60]}"


def _text_problem(text: str) -> str | None:
    if "\x00" in text:
        return "contains a NUL character; expected text without control character U+0000"
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            return f"contains a lone surrogate U+{ord(text[e.start]):04X} (not valid Unicode); expected text"
    return None


def check_values(row: Any, where: str) -> BadRow | None:
    """A bad row if any value, at any depth, cannot be carried through safely: unreadable numbers,
    lone surrogates or NUL in text, nesting deeper than `MAX_DEPTH`. Walked without recursion."""
    stack: list[tuple[Any, str, int]] = [(row, "", 0)]
    while stack:
        value, path, depth = stack.pop()
        problem = code = None
        if depth > MAX_DEPTH:
            code, problem = "too_deep", f"nested deeper than {MAX_DEPTH} levels; expected a flat row"
        elif isinstance(value, Unreadable):
            code, problem = "bad_number", value.reason
        elif isinstance(value, str):
            code, problem = "invalid_text", _text_problem(value)
        elif isinstance(value, dict):
            for key, item in value.items():
                name = f"{path}.{key}" if path else str(key)
                if isinstance(key, str) and (key_problem := _text_problem(key)):
                    return BadRow(
                        where, name, "invalid_text", f"its name {key_problem}", _reportable(row, "invalid_text")
                    )
                stack.append((item, name, depth + 1))
        elif isinstance(value, (list, tuple)):
            stack.extend((item, f"{path}[{i}]", depth + 1) for i, item in enumerate(value))
        if problem:
            return BadRow(where, path or None, code, problem, _reportable(row, code))
    return None


def _reportable(row: Any, code: str) -> Any:
    """What a report keeps of such a row: invalid text as ASCII JSON (reports are written as UTF-8),
    a too deep value abbreviated (writing it whole would exhaust the recursion limit)."""
    if code == "invalid_text":
        return json.dumps(row, default=str)
    return reprlib.repr(row) if code == "too_deep" else row


@dataclass(frozen=True)
class SchemaChoice:
    """The schema of one file, the rows that voted for each schema, and why, for bad-row reasons."""

    schema: str
    votes: dict[str, int] = field(default_factory=dict)
    note: str = ""


def row_schema(row: Any, columns: dict[str, str]) -> str | None:
    """The schema one row is evidence of: message-list sides are conversational, a prompt field
    (even null) explicit, string sides without one implicit; None for rows that say nothing."""
    if not isinstance(row, dict):
        return None
    chosen, rejected = row.get(columns["chosen"]), row.get(columns["rejected"])
    if isinstance(chosen, list) or isinstance(rejected, list):
        return "conversational"
    if columns["prompt"] in row:
        return "explicit"
    return "implicit" if isinstance(chosen, str) or isinstance(rejected, str) else None


def _evidence(schema: str, columns: dict[str, str]) -> str:
    return {
        "explicit": f"have a {columns['prompt']!r} field",
        "conversational": "have message lists",
        "implicit": f"have no {columns['prompt']!r} field",
    }[schema]


def decide_schema(rows: Iterable[Any], columns: dict[str, str], forced: str = "auto", name: str = "") -> SchemaChoice:
    """The schema most rows of one file support (ties go to the earlier of `SCHEMAS`), or `forced`;
    logs the decision, its counts and, for implicit files, the columns (a misnamed prompt column
    would otherwise vanish silently)."""
    if forced != "auto":
        if forced not in SCHEMAS:
            raise DataError(f"data.schema: unknown {forced!r}; expected auto or one of {', '.join(SCHEMAS)}")
        return SchemaChoice(forced, {}, f"data.schema={forced}")
    votes: Counter[str] = Counter()
    keys: dict[str, None] = {}
    for row in rows:
        if (schema := row_schema(row, columns)) is not None:
            votes[schema] += 1
            if len(keys) < 50:
                keys.update(dict.fromkeys(map(str, row)))
    total = sum(votes.values())
    schema = max(SCHEMAS, key=lambda s: votes[s])
    note = f"this file is {schema}: {votes[schema]} of {total} rows {_evidence(schema, columns)}"
    counts = ", ".join(f"{votes[s]} {s}" for s in SCHEMAS if votes[s])
    if len(votes) > 1:
        log.warning(
            "%s: rows disagree on the schema (%s): read as %s; rows that do not fit are bad rows", name, counts, schema
        )
    elif total:
        log.info("%s: schema %s (%d rows)", name, schema, total)
    if schema == "implicit":
        log.warning(
            "%s: read as implicit (no %r column in %d rows; the prompt is the shared start of chosen and rejected); "
            "its columns are %s; if one of them holds the prompt, set data.columns.prompt=NAME",
            name,
            columns["prompt"],
            votes["implicit"],
            ", ".join(keys),
        )
    return SchemaChoice(schema, dict(votes), note)


def split_schema(choices: Iterable[SchemaChoice]) -> str:
    """The schema of a split of several files: the one they share, or all of them joined by '+'."""
    return "+".join(dict.fromkeys(c.schema for c in choices)) or "explicit"


def check_messages(value: Any) -> str | None:
    """None if `value` is a non-empty list of {role, content} string messages with known roles,
    else what is wrong."""
    if not isinstance(value, list) or not value:
        return f"expected a non-empty list of messages, got {describe_value(value)}"
    for i, m in enumerate(value):
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            return f"message {i}: expected {{'role': str, 'content': str}}, got {describe_value(m)}"
        if m["role"] not in ROLES:
            return f"message {i}: unknown role {m['role']!r}; expected one of {', '.join(ROLES)}"
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


def parse_number(value: Any, row: Any) -> float | str:
    """A number (a plain decimal string too); None, or an empty CSV cell, means no margin."""
    if value is None or (value == "" and isinstance(row, TextRow)):
        return math.nan
    if isinstance(value, str):
        if not PLAIN_NUMBER.fullmatch(value):
            return f"expected a number, got str {value[:40]!r} (a string margin must be a plain decimal like 1.5)"
    elif isinstance(value, bool) or not isinstance(value, (Real, Decimal)):
        return f"expected a number, got {describe_value(value)}"
    try:
        number = float(value)
    except OverflowError:
        number = math.inf
    except ValueError:  # Decimal('sNaN')
        number = math.nan
    return number if math.isfinite(number) else f"expected a finite number, got {describe_value(value)}"


def parse_flag(value: Any, row: Any) -> bool | str:
    """A yes/no field such as `tie`: true/false (as JSON, or the text of a CSV cell); None, or an empty
    cell, is false. Anything else is a reason: 1, "yes" or "tie" are not guessed at."""
    if value is None or (value == "" and isinstance(row, TextRow)):
        return False
    if isinstance(value, bool):
        return value
    if isinstance(row, TextRow) and isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    return f"expected true or false, got {describe_value(value)}"


def _squeezed(value: str | list[dict]) -> Any:
    """A side without its whitespace: sides equal this way differ in whitespace only."""
    if isinstance(value, str):
        return "".join(value.split())
    return [{**m, "content": "".join(m["content"].split())} for m in value]


def check_row(row: Any, where: str, schema: str | SchemaChoice, columns: dict[str, str]) -> Pair | BadRow:
    """Validate one raw row against its file's schema (a name, or `decide_schema`'s choice, whose
    counts then explain a row that does not fit) and return a `Pair`, or a `BadRow` saying why not."""
    choice = schema if isinstance(schema, SchemaChoice) else SchemaChoice(schema)
    own = row_schema(row, columns)
    why = f"{choice.note}; this row looks {own}" if choice.note and own not in (None, choice.schema) else ""
    result = _check(row, where, choice.schema, columns, why)
    if why and isinstance(result, BadRow) and why not in result.reason:
        result.reason += f" ({why})"
    return result


def _check(row: Any, where: str, schema: str, c: dict[str, str], why: str) -> Pair | BadRow:
    if isinstance(row, BadRow):
        return row
    if (bad := check_values(row, where)) is not None:
        return bad
    if not isinstance(row, dict):
        return BadRow(
            where,
            None,
            "not_an_object",
            f"expected an object with fields {c['chosen']!r} and {c['rejected']!r}, got {describe_value(row)}",
            row,
        )
    needed = ("prompt", "chosen", "rejected") if schema == "explicit" else ("chosen", "rejected")
    missing = [k for k in needed if c[k] not in row]
    if missing:
        why = why or f"an {schema} row needs {[c[k] for k in needed]}"
        has = ", ".join(repr(str(k)) for k in list(row)[:20]) or "none"
        mapping = " ".join(f"data.columns.{k}=<your column>" for k in missing)
        reason = f"missing field {c[missing[0]]!r} ({why}); this row's fields are {has}: map yours with {mapping}"
        return BadRow(where, c[missing[0]], "missing_field", reason, row)
    if schema == "implicit" and c["prompt"] in row:
        return BadRow(
            where,
            c["prompt"],
            "unexpected_field",
            f"this file is read as implicit (prompt = the shared start of {c['chosen']!r} and {c['rejected']!r}), "
            f"so this row's {c['prompt']!r} would be lost",
            row,
        )
    margin = parse_number(row.get(c["margin"]), row)
    if isinstance(margin, str):
        return BadRow(where, c["margin"], "bad_margin", margin, row)
    subset = row.get(c["subset"])
    subset = "" if subset is None else str(subset)
    tie = parse_flag(row.get(c["tie"]), row) if "tie" in c else False
    if isinstance(tie, str):
        return BadRow(where, c["tie"], "bad_tie", tie, row)
    chosen, rejected, prompt = row[c["chosen"]], row[c["rejected"]], row.get(c["prompt"])

    if schema == "conversational":
        for key, value in (("chosen", chosen), ("rejected", rejected)):
            if (problem := check_messages(value)) is not None:
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
        elif (problem := check_messages(prompt)) is not None:
            return BadRow(where, c["prompt"], "bad_messages", problem, row)
        for key, value in (("chosen", chosen), ("rejected", rejected)):
            if not "".join(m["content"] for m in value).strip():
                return BadRow(where, c[key], "empty_response", "empty response", row)
        return _distinct(Pair(prompt, chosen, rejected, margin, subset, tie), where, c, row)

    fields = (("chosen", chosen), ("rejected", rejected)) + ((("prompt", prompt),) if schema == "explicit" else ())
    for key, value in fields:
        if not isinstance(value, str):
            return BadRow(where, c[key], "not_a_string", f"expected a string, got {describe_value(value)}", row)
    if schema == "implicit":
        n = _split_implicit(chosen, rejected)
        prompt, chosen, rejected = chosen[:n], chosen[n:], rejected[n:]
    for key, value in (("chosen", chosen), ("rejected", rejected)):
        if not value.strip():
            return BadRow(where, c[key], "empty_response", "empty response", row)
    return _distinct(Pair(prompt, chosen, rejected, margin, subset, tie), where, c, row)


def _distinct(pair: Pair, where: str, c: dict[str, str], row: Any) -> Pair | BadRow:
    """Chosen and rejected must differ in more than whitespace: otherwise there is nothing to learn."""
    if pair.chosen == pair.rejected:
        return BadRow(where, c["rejected"], "identical", "identical to chosen", row)
    if _squeezed(pair.chosen) == _squeezed(pair.rejected):
        return BadRow(where, c["rejected"], "identical", "identical to chosen except for whitespace", row)
    return pair
