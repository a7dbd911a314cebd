"""Rows: schemas, checks and the bad-row vocabulary."""

from __future__ import annotations

import math

from rewardlab.data.rows import BadRow, Pair, check_row, detect_schema
from rewardlab.data.sources import read_source

from ..conftest import FIXTURES
from .common import COLUMNS


def test_explicit_rows_with_margin_and_subset():
    rows = list(read_source(str(FIXTURES / "explicit.jsonl"), "train"))
    assert rows[0][0] == f"{FIXTURES / 'explicit.jsonl'}:1"
    pairs = [check_row(r, w, "explicit", COLUMNS) for w, r in rows]
    assert pairs[0] == Pair("What is the capital of France?", "Paris.", "Lyon.", 2.0, "facts")
    assert pairs[1].margin == 1.0 and pairs[2].prompt == "" and math.isnan(pairs[2].margin)


def test_conversational_rows_with_and_without_prompt():
    rows = [r for _, r in read_source(str(FIXTURES / "conversational.jsonl"), "train")]
    assert [detect_schema(r, COLUMNS) for r in rows] == ["conversational"] * 3
    first, second, third = (check_row(r, "x", "conversational", COLUMNS) for r in rows)
    assert first.prompt == [{"role": "user", "content": "What is 2 + 2?"}]
    assert first.chosen == [{"role": "assistant", "content": "4"}]
    # no prompt: the shared leading messages are the prompt
    assert second.prompt == [{"role": "user", "content": "Name a colour."}]
    assert second.chosen == [{"role": "assistant", "content": "Blue."}]
    assert second.rejected == [{"role": "assistant", "content": "Seven."}]
    assert third.prompt == [{"role": "user", "content": "A plain string prompt."}]


def test_implicit_rows_split_at_the_shared_prefix_on_a_word_boundary():
    rows = [r for _, r in read_source(str(FIXTURES / "implicit.jsonl"), "train")]
    assert detect_schema(rows[0], COLUMNS) == "implicit"
    egg, sky = (check_row(r, "x", "implicit", COLUMNS) for r in rows)
    assert egg.prompt == "\n\nHuman: How do I boil an egg?\n\nAssistant: "
    assert (egg.chosen, egg.rejected) == ("Put it in boiling water for nine minutes.", "I don't know.")
    # "Yes." vs "Yes, on a clear day.": the prefix "Yes" is backed off to the word boundary
    assert sky.prompt.endswith("Assistant: ") and (sky.chosen, sky.rejected) == ("Yes, on a clear day.", "Yes.")
    assert egg.prompt + egg.chosen == rows[0]["chosen"]


def test_implicit_split_inside_a_word_backs_off():
    pair = check_row({"chosen": "Answer: 12", "rejected": "Answer: 13"}, "x", "implicit", COLUMNS)
    assert (pair.prompt, pair.chosen, pair.rejected) == ("Answer: ", "12", "13")


def test_columns_can_be_remapped():
    cols = {**COLUMNS, "prompt": "question", "chosen": "good", "rejected": "bad"}
    pair = check_row({"question": "q", "good": "a", "bad": "b"}, "x", "explicit", cols)
    assert (pair.prompt, pair.chosen, pair.rejected) == ("q", "a", "b")


def test_bad_row_message_names_location_and_field():
    assert (
        BadRow("f.jsonl:3", "chosen", "empty_response", "empty response", {}).message()
        == "f.jsonl:3: field 'chosen': empty response"
    )
