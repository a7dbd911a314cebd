"""Groups: rankings of K responses and ratings of single responses, and the pairs made of them.

A ranking row is `{prompt, responses: [r1, ..., rK], ranks: [...]}` (1 is best) or `{..., scores: [...]}`
(higher is better); a rating row is `{prompt, response, score}` or `{prompt, response, scores: {attribute:
value}}`. The ratings of one prompt (the same prompt exactly) form one group, in reading order. Equal
scores are ties. Every group has a combined score per response: a ranking's, or the ratings weighted by
`data.attributes` (Σ w_a · s_a), which orders its responses for pairs and for Plackett–Luce.

`group_pairs` turns a group into preference pairs (all, or neighbours in score order) with the score gap
as margin, so every pairwise loss trains on rankings and ratings too; what it does not make is counted.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from itertools import combinations
from typing import Any

from rewardlab.data.rows import (
    BadRow,
    DataError,
    Pair,
    check_messages,
    check_values,
    describe_value,
    parse_number,
)

log = logging.getLogger(__name__)

KINDS = ("pairs", "rankings", "ratings")
PAIRINGS = ("all", "adjacent")
MAX_SCORE = 1e30  # far beyond any rating scale; keeps every gap finite in float32


@dataclass
class Group:
    """One prompt's responses with their combined scores (and, for ratings, each attribute's value)."""

    prompt: str | list[dict]
    responses: list[str | list[dict]]
    scores: list[float]
    attributes: list[list[float]] | None  # per response, one value per `data.attributes` name
    where: list[str]  # per response: its file and line
    rows: list[int]  # per response: its row's index in reading order
    subset: str


def row_kind(row: Any, c: dict[str, str]) -> str | None:
    """What one row is evidence of: a pair (chosen or rejected), a ranking (responses) or a rating (response)."""
    if not isinstance(row, dict):
        return None
    if c["chosen"] in row or c["rejected"] in row:  # a pair, whatever other columns it carries
        return "pairs"
    if c["responses"] in row:
        return "rankings"
    return "ratings" if c["response"] in row else None


def decide_kind(rows: Iterable[Any], c: dict[str, str], name: str) -> str:
    """The kind most rows of one file are (pairs for a file with none); rows of another kind are bad rows."""
    votes = Counter(kind for row in rows if (kind := row_kind(row, c)) is not None)
    kind = max(KINDS, key=lambda k: votes[k])
    if len(votes) > 1:
        counts = ", ".join(f"{votes[k]} {k}" for k in KINDS if votes[k])
        log.warning("%s: rows disagree on what they are (%s): read as %s; the others are bad rows", name, counts, kind)
    return kind


def _prompt(row: Any, where: str, c: dict[str, str]) -> str | list[dict] | BadRow:
    """The prompt of a ranking or rating row (text or messages), or why the row cannot be one: values that
    cannot be carried, not an object, no usable prompt."""
    if (bad := check_values(row, where)) is not None:
        return bad
    if not isinstance(row, dict):
        return BadRow(where, None, "not_an_object", f"expected an object, got {describe_value(row)}", row)
    prompt = row.get(c["prompt"])
    if isinstance(prompt, str) or check_messages(prompt) is None:
        return prompt
    if c["prompt"] not in row:
        return BadRow(where, c["prompt"], "missing_field", f"missing field {c['prompt']!r} (the prompt)", row)
    return BadRow(
        where, c["prompt"], "not_a_string", f"expected a string or messages, got {describe_value(prompt)}", row
    )


def check_response(value: Any, where: str, field: str, row: Any) -> BadRow | None:
    """None for a non-empty response (text or messages), else why not."""
    if isinstance(value, list):
        if (problem := check_messages(value)) is not None:
            return BadRow(where, field, "bad_messages", problem, row)
        text = "".join(m["content"] for m in value)
    elif isinstance(value, str):
        text = value
    else:
        return BadRow(where, field, "not_a_string", f"expected a string or messages, got {describe_value(value)}", row)
    return None if text.strip() else BadRow(where, field, "empty_response", "empty response", row)


def _number(value: Any, where: str, field: str, row: Any) -> float | BadRow:
    number = "expected a number, got null" if value is None else parse_number(value, row)
    if isinstance(number, float) and number != number:  # an empty CSV cell
        number = "expected a number, got an empty cell"
    elif isinstance(number, float) and abs(number) > MAX_SCORE:  # gaps and float32 tensors must stay finite
        number = f"expected a number within ±{MAX_SCORE:g}, got {number:g}"
    return BadRow(where, field, "bad_score", number, row) if isinstance(number, str) else number


def _squeezed(value: str | list[dict]) -> str:
    if isinstance(value, str):
        return "".join(value.split())
    return json.dumps([{**m, "content": "".join(m["content"].split())} for m in value], sort_keys=True)


def check_ranking(row: Any, where: str, index: int, c: dict[str, str]) -> Group | BadRow:
    """One ranking row as a group, or why it cannot be one: at least 2 distinct responses and exactly
    one of `ranks` (lower is better) or `scores` (higher is better), one number per response."""
    prompt = _prompt(row, where, c)
    if isinstance(prompt, BadRow):
        return prompt
    responses = row.get(c["responses"])
    if not isinstance(responses, list) or len(responses) < 2:
        got = f"{len(responses)} response" if isinstance(responses, list) else describe_value(responses)
        return BadRow(where, c["responses"], "too_few_responses", f"expected a list of at least 2, got {got}", row)
    for i, response in enumerate(responses):
        if (bad := check_response(response, where, f"{c['responses']}[{i}]", row)) is not None:
            return bad
    seen: dict[str, int] = {}
    for i, response in enumerate(responses):
        if (j := seen.setdefault(_squeezed(response), i)) != i:
            reason = f"identical to response {j} (up to whitespace): a ranking compares different responses"
            return BadRow(where, f"{c['responses']}[{i}]", "identical", reason, row)
    given = [k for k in ("ranks", "scores") if c[k] in row]
    if len(given) != 1:
        what = "both" if given else "neither"
        reason = f"expected exactly one of {c['ranks']!r} (1 is best) or {c['scores']!r} (higher is better), got {what}"
        return BadRow(where, c["ranks"], "no_order", reason, row)
    key = given[0]
    values = row[c[key]]
    if not isinstance(values, list) or len(values) != len(responses):
        got = f"{len(values)} values" if isinstance(values, list) else describe_value(values)
        reason = f"expected a list of {len(responses)} numbers, one per response, got {got}"
        return BadRow(where, c[key], "bad_order", reason, row)
    numbers = []
    for i, value in enumerate(values):
        number = _number(value, where, f"{c[key]}[{i}]", row)
        if isinstance(number, BadRow):
            return number
        numbers.append(-number if key == "ranks" else number)
    subset = "" if row.get(c["subset"]) is None else str(row[c["subset"]])
    k = len(responses)
    return Group(prompt, list(responses), numbers, None, [f"{where} {c['responses']}[{i}]" for i in range(k)],
                 [index] * k, subset)  # fmt: skip


def check_rating(row: Any, where: str, c: dict[str, str], attributes: dict[str, float]) -> tuple | BadRow:
    """One rating row as (prompt, response, its value per attribute), or why not: a `score` where one
    attribute is configured, else `scores` naming exactly the configured attributes."""
    prompt = _prompt(row, where, c)
    if isinstance(prompt, BadRow):
        return prompt
    response = row[c["response"]]
    if (bad := check_response(response, where, c["response"], row)) is not None:
        return bad
    names = list(attributes)
    if c["score"] in row and c["scores"] in row:
        reason = f"both {c['score']!r} and {c['scores']!r}; expected one (a rating has one set of scores)"
        return BadRow(where, c["score"], "two_scores", reason, row)
    if c["score"] in row:
        if len(names) != 1:
            reason = f"one score, but data.attributes names {len(names)} ({', '.join(names)}): give {c['scores']!r}"
            return BadRow(where, c["score"], "one_score", reason + " as {attribute: value}", row)
        value = _number(row[c["score"]], where, c["score"], row)
        return value if isinstance(value, BadRow) else (prompt, response, [value])
    scores = row.get(c["scores"])
    if not isinstance(scores, dict):
        reason = f"expected {c['score']!r} (a number) or {c['scores']!r} ({{{', '.join(names)}: numbers}}), got " + (
            "both" if c["score"] in row else describe_value(scores)
        )
        return BadRow(where, c["scores"], "no_score", reason, row)
    for name in scores:
        if name not in attributes:
            reason = f"unknown attribute {name!r}; data.attributes names {', '.join(names)} (add it there to use it)"
            return BadRow(where, f"{c['scores']}.{name}", "unknown_attribute", reason, row)
    values = []
    for name in names:
        if name not in scores:
            reason = f"missing attribute {name!r}; every rating needs all of {', '.join(names)} (data.attributes)"
            return BadRow(where, f"{c['scores']}.{name}", "missing_attribute", reason, row)
        value = _number(scores[name], where, f"{c['scores']}.{name}", row)
        if isinstance(value, BadRow):
            return value
        values.append(value)
    return prompt, response, values


def combined(values: list[float], attributes: dict[str, float]) -> float:
    """A rating's combined score: Σ_a w_a · value_a with the weights of `data.attributes`."""
    return sum(w * v for w, v in zip(attributes.values(), values))


def read_groups(
    rows: Iterable[tuple[str, Any]], kind: str, c: dict[str, str], attributes: dict[str, float]
) -> Iterator[tuple[int, Group | BadRow]]:
    """(row index, group or bad row) for a rankings or ratings file read in order: a ranking as soon as it
    is read, ratings once the file is read (a prompt's ratings may be anywhere in it); a response rated
    twice under one prompt is a bad row naming the first."""
    by_prompt: dict[str, Group] = {}
    first: dict[tuple[str, str], str] = {}
    for index, (where, row) in enumerate(rows):
        if isinstance(row, BadRow):
            yield index, row
            continue
        if row_kind(row, c) != kind:
            reason = (
                f"this file holds {kind}, this row looks {row_kind(row, c) or 'like none of pairs, rankings, ratings'}"
            )
            yield index, BadRow(where, None, "wrong_kind", reason, row)
            continue
        if kind == "rankings":
            found = check_ranking(row, where, index, c)
            yield index, found if isinstance(found, BadRow) else conversational(found)
            continue
        found = check_rating(row, where, c, attributes)
        if isinstance(found, BadRow):
            yield index, found
            continue
        prompt, response, values = found
        key = json.dumps(prompt, sort_keys=True)
        if (at := first.setdefault((key, _squeezed(response)), where)) != where:
            reason = f"this prompt's response is already rated at {at} (up to whitespace); rate it once"
            yield index, BadRow(where, c["response"], "rated_twice", reason, row)
            continue
        subset = "" if row.get(c["subset"]) is None else str(row[c["subset"]])
        group = by_prompt.setdefault(key, Group(prompt, [], [], [], [], [], subset))
        group.responses.append(response)
        group.scores.append(combined(values, attributes))
        group.attributes.append(values)
        group.where.append(where)
        group.rows.append(index)
    for group in by_prompt.values():
        yield group.rows[0], conversational(group)


def conversational(group: Group) -> Group:
    """A group with any message list, as messages throughout: a text prompt becomes the user's message, a text
    response the assistant's (as for pairs, the chat template then formats every response alike)."""
    if isinstance(group.prompt, list) or any(isinstance(r, list) for r in group.responses):
        if isinstance(group.prompt, str):
            group.prompt = [{"role": "user", "content": group.prompt}]
        group.responses = [[{"role": "assistant", "content": r}] if isinstance(r, str) else r for r in group.responses]
    return group


def group_pairs(
    group: Group, pairing: str, min_gap: float, ties: str, counts: Counter
) -> Iterator[tuple[Pair, str, int]]:
    """The preference pairs of a group, each with where it came from and the chosen response's row index:
    every two responses (`all`) or neighbours in score order (`adjacent`); the higher scored is chosen and
    the score gap is the margin. Equal scores make a tie pair with `ties=keep`; gaps under `min_gap` make
    none. What is not made is counted in `counts` (`not_paired:<why>`). Each pair's `key` names its responses:
    `row:i>j` (a ranking's row, the positions of chosen and rejected) or `row>row` (two ratings' rows)."""
    if len(group.responses) == 1:
        counts["not_paired:single_response"] += 1  # a prompt rated once: nothing to compare it with
    order = sorted(range(len(group.scores)), key=lambda k: -group.scores[k])
    candidates = combinations(range(len(order)), 2) if pairing == "all" else zip(order, order[1:])
    for a, b in candidates:
        hi, lo = (a, b) if group.scores[a] >= group.scores[b] else (b, a)
        gap = group.scores[hi] - group.scores[lo]
        if gap == 0 and ties == "skip":
            counts["not_paired:equal_scores"] += 1
            continue
        if 0 < gap < min_gap:
            counts["not_paired:under_min_gap"] += 1
            continue
        first, second = group.rows[hi] + 1, group.rows[lo] + 1  # 1-based, as files are read
        key = f"{first}:{hi}>{lo}" if first == second else f"{first}>{second}"  # a ranking's positions, or two rows
        pair = Pair(group.prompt, group.responses[hi], group.responses[lo], gap, group.subset, gap == 0, key)
        yield pair, f"{group.where[hi]} over {group.where[lo]}", group.rows[hi]


def check_kind(kind: str, source: str, unit: str, pairs_from: str | None) -> None:
    """What a training file holds must fit what the loss trains on (`unit`: pairs, lists or points) and
    `data.pairs_from`: refused clearly, never guessed."""
    if unit == "pairs" and kind != "pairs" and pairs_from != kind:
        raise DataError(
            f"{source} holds {kind}, and this loss trains on pairs: set data.pairs_from={kind} to make pairs "
            "of them (data.pairs, data.min_gap), or train on them as they are with loss=plackett_luce "
            "or loss=regression"
        )
    if pairs_from is not None and (unit != "pairs" or kind != pairs_from):
        why = f"{source} holds {kind}" if kind != pairs_from else "this loss trains on groups, not pairs"
        raise DataError(f"data.pairs_from={pairs_from}: {why}; unset it (data.pairs_from=null)")
    if unit == "points" and kind != "ratings":
        raise DataError(f"loss=regression fits ratings, but {source} holds {kind}: give a file of ratings rows")
