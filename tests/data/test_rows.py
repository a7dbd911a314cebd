"""Rows: schemas decided from all rows of a file, checks, and the bad-row vocabulary."""

from __future__ import annotations

import json
import math
import re
from decimal import Decimal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rewardlab.data.rows import (
    ROLES,
    SCHEMAS,
    BadRow,
    Pair,
    TextRow,
    check_row,
    check_values,
    decide_schema,
    row_schema,
)
from rewardlab.data.sources import read_source

from ..conftest import FIXTURES
from .common import COLUMNS, datamodule, ready, write

EXPLICIT = {"prompt": "What is the capital of France?", "chosen": "Paris.", "rejected": "Lyon."}
CONVERSATIONAL = {
    "chosen": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}],
    "rejected": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Go away."}],
}
IMPLICIT = {"chosen": "Human: Hi Assistant: Hello!", "rejected": "Human: Hi Assistant: Go away."}
NULL_PROMPT = {"prompt": None, "chosen": "a", "rejected": "b"}
KINDS = {"explicit": EXPLICIT, "null_prompt": NULL_PROMPT, "conversational": CONVERSATIONAL, "implicit": IMPLICIT}
EVIDENCE = {
    "explicit": "explicit",
    "null_prompt": "explicit",
    "conversational": "conversational",
    "implicit": "implicit",
}


def test_explicit_rows_with_margin_and_subset():
    rows = list(read_source(str(FIXTURES / "explicit.jsonl"), "train"))
    assert rows[0][0] == f"{FIXTURES / 'explicit.jsonl'}:1"
    pairs = [check_row(r, w, "explicit", COLUMNS) for w, r in rows]
    assert pairs[0] == Pair("What is the capital of France?", "Paris.", "Lyon.", 2.0, "facts")
    assert pairs[1].margin == 1.0 and pairs[2].prompt == "" and math.isnan(pairs[2].margin)


def test_conversational_rows_with_and_without_prompt():
    rows = [r for _, r in read_source(str(FIXTURES / "conversational.jsonl"), "train")]
    assert [row_schema(r, COLUMNS) for r in rows] == ["conversational"] * 3
    assert decide_schema(rows, COLUMNS).schema == "conversational"
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
    assert decide_schema(rows, COLUMNS).schema == "implicit"
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
    assert decide_schema([{"question": None, "good": "a", "bad": "b"}], cols).schema == "explicit"


def test_bad_row_message_names_location_and_field():
    assert (
        BadRow("f.jsonl:3", "chosen", "empty_response", "empty response", {}).message()
        == "f.jsonl:3: field 'chosen': empty response"
    )


# ------------------------------------------------------------------ class 1: schema from all rows


@settings(max_examples=60, deadline=None)
@given(kinds=st.lists(st.sampled_from(sorted(KINDS)), min_size=1, max_size=12))
def test_the_schema_is_the_one_most_rows_support_and_misfits_say_why(kinds):
    rows = [KINDS[k] for k in kinds]
    votes = {s: sum(EVIDENCE[k] == s for k in kinds) for s in SCHEMAS}
    expected = max(SCHEMAS, key=votes.get)  # ties: explicit, then conversational, then implicit
    choice = decide_schema(rows, COLUMNS)
    assert choice.schema == expected and {s: n for s, n in votes.items() if n} == choice.votes
    for n, (kind, row) in enumerate(zip(kinds, rows), start=1):
        result = check_row(row, f"f.jsonl:{n}", choice, COLUMNS)
        if EVIDENCE[kind] == expected and kind != "null_prompt":
            assert isinstance(result, Pair)
            if expected == "explicit":
                assert result.prompt == row["prompt"]  # no prompt ever disappears
            continue
        assert isinstance(result, BadRow) and result.where == f"f.jsonl:{n}"
        if EVIDENCE[kind] != expected:  # a row of another schema says which and how many rows decided
            assert f"this file is {expected}: {votes[expected]} of {len(kinds)} rows" in result.reason


def test_a_null_prompt_on_line_1_does_not_make_the_file_implicit(tmp_path, tiny_tokenizer):
    rows = [NULL_PROMPT] + [{"prompt": f"q{i}", "chosen": f"yes {i}", "rejected": f"no {i}"} for i in range(4)]
    path = write(tmp_path, "t.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(Exception, match=r"t\.jsonl:1: field 'prompt': expected a string, got null"):
        datamodule(tiny_tokenizer, tmp_path, train_file=str(path)).prepare_data()
    dm = ready(datamodule(tiny_tokenizer, tmp_path, train_file=str(path), on_bad_row="skip"))
    meta = dm.datasets["train"].meta
    assert meta["schema"] == "explicit" and meta["counts"]["used"] == 4 and meta["counts"]["skipped:not_a_string"] == 1


def test_an_implicit_row_before_explicit_ones_is_a_bad_row_naming_the_missing_prompt(tmp_path, tiny_tokenizer, caplog):
    rows = [IMPLICIT] + [{"prompt": f"q{i}", "chosen": f"yes {i}", "rejected": f"no {i}"} for i in range(9)]
    path = write(tmp_path, "t.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(
        Exception, match=r"t\.jsonl:1: field 'prompt': missing field 'prompt' \(this file is explicit: 9 of 10"
    ):
        datamodule(tiny_tokenizer, tmp_path, train_file=str(path)).prepare_data()
    with caplog.at_level("INFO"):
        dm = ready(datamodule(tiny_tokenizer, tmp_path, train_file=str(path), on_bad_row="skip"))
    assert dm.datasets["train"].meta["counts"] == {"read": 10, "used": 9, "skipped:missing_field": 1}
    assert "rows disagree on the schema (9 explicit, 1 implicit): read as explicit" in caplog.text


def test_an_explicit_row_in_an_implicit_file_is_a_bad_row_not_a_lost_prompt():
    rows = [IMPLICIT] * 3 + [EXPLICIT]
    choice = decide_schema(rows, COLUMNS)
    bad = check_row(EXPLICIT, "f:4", choice, COLUMNS)
    assert choice.schema == "implicit" and bad.code == "unexpected_field" and bad.field == "prompt"
    assert "would be lost" in bad.reason and "this file is implicit: 3 of 4 rows" in bad.reason


def test_an_implicit_file_says_so_and_lists_its_columns(caplog):
    rows = [{"question": "q", "chosen": "a b", "rejected": "a c"}] * 2
    with caplog.at_level("INFO"):
        assert decide_schema(rows, COLUMNS, name="data.jsonl").schema == "implicit"
    assert "data.jsonl: read as implicit" in caplog.text and "question, chosen, rejected" in caplog.text
    assert "data.columns.prompt" in caplog.text


def test_a_forced_schema_is_used_and_named_in_reasons():
    choice = decide_schema(iter(()), COLUMNS, "explicit")
    bad = check_row(IMPLICIT, "f:1", choice, COLUMNS)
    assert choice.schema == "explicit" and "data.schema=explicit" in bad.reason
    with pytest.raises(ValueError, match="data.schema: unknown 'tabular'"):
        decide_schema([], COLUMNS, "tabular")


def test_each_file_of_a_folder_gets_its_own_schema(tmp_path, tiny_tokenizer):
    folder = tmp_path / "mixed"
    folder.mkdir()
    write(folder, "a.jsonl", "".join(json.dumps({**EXPLICIT, "chosen": f"Paris {i}."}) + "\n" for i in range(3)))
    write(
        folder,
        "b.jsonl",
        "".join(json.dumps({**IMPLICIT, "chosen": f"Human: Hi Assistant: Hi {i}"}) + "\n" for i in range(2)),
    )
    dm = ready(datamodule(tiny_tokenizer, tmp_path, train_file=str(folder)))
    meta = dm.datasets["train"].meta
    assert meta["schema"] == "explicit+implicit" and meta["counts"] == {"read": 5, "used": 5}


# ------------------------------------------------------------- class 2 and 4: values and margins

BAD_TEXT = st.sampled_from(["\x00", "\ud800", "\udfff", "\udc80"])


@settings(max_examples=60, deadline=None)
@given(
    text=st.text(max_size=20),
    bad=BAD_TEXT,
    where=st.sampled_from(["prompt", "chosen", "rejected", "subset", "extra"]),
    at=st.integers(0, 20),
)
def test_nul_or_a_lone_surrogate_in_any_text_is_a_bad_row_naming_the_field(text, bad, where, at):
    row = {**EXPLICIT, where: text[:at] + bad + text[at:]}
    result = check_row(row, "f.jsonl:7", "explicit", COLUMNS)
    assert isinstance(result, BadRow) and (result.code, result.field) == ("invalid_text", where)
    assert result.message().startswith("f.jsonl:7: field ") and "expected" in result.reason
    json.dumps(result.row, ensure_ascii=False).encode("utf-8")  # the report can always be written


def test_invalid_text_inside_messages_names_the_message():
    row = json.loads(json.dumps(CONVERSATIONAL))
    row["rejected"][1]["content"] = "Go \ud83d away"
    result = check_row(row, "f:2", "conversational", COLUMNS)
    assert (result.code, result.field) == ("invalid_text", "rejected[1].content")


def test_nesting_deeper_than_the_limit_is_a_bad_row():
    deep: list = []
    for _ in range(150):
        deep = [deep]
    result = check_values({**EXPLICIT, "meta": deep}, "f:1")
    assert result.code == "too_deep" and result.field.startswith("meta[0]")


PLAIN = st.from_regex(r"\A[+-]?([0-9]{1,5}(\.[0-9]{0,3})?|\.[0-9]{1,3})([eE][+-]?[0-9]{1,2})?\Z")


@settings(max_examples=100, deadline=None)
@given(margin=PLAIN | st.text(max_size=8))
def test_a_string_margin_must_be_a_plain_decimal(margin):
    result = check_row({**EXPLICIT, "margin": margin}, "f:1", "explicit", COLUMNS)
    plain = re.fullmatch(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?", margin, re.ASCII) is not None
    assert isinstance(result, Pair) == (plain and math.isfinite(float(margin)))
    if isinstance(result, Pair):
        assert result.margin == float(margin)
    else:
        assert result.field == "margin" and result.code in ("bad_margin", "invalid_text")  # NUL: invalid text


@pytest.mark.parametrize(
    "margin", ["nan", "inf", "-Infinity", "1_000", " 2", "2 ", "٣", "0x10", "", "1e999", True, False, [1], {"a": 1}]
)
def test_margins_that_are_not_plain_finite_numbers_are_bad_rows(margin):
    result = check_row({**EXPLICIT, "margin": margin}, "f:3", "explicit", COLUMNS)
    assert (
        isinstance(result, BadRow)
        and result.code == "bad_margin"
        and result.message().startswith("f:3: field 'margin'")
    )


@pytest.mark.parametrize(
    "margin, value",
    [("1.5", 1.5), ("-2", -2.0), ("+.5", 0.5), ("3.", 3.0), ("1e2", 100.0), (2, 2.0), (Decimal("0.25"), 0.25)],
)
def test_plain_numbers_are_margins(margin, value):
    assert check_row({**EXPLICIT, "margin": margin}, "f:1", "explicit", COLUMNS).margin == value


@pytest.mark.parametrize("margin", [math.inf, -math.inf, math.nan, 10**400, Decimal("NaN"), Decimal("sNaN")])
def test_non_finite_or_overflowing_margins_are_bad_rows(margin):
    assert check_row({**EXPLICIT, "margin": margin}, "f:1", "explicit", COLUMNS).code == "bad_margin"


def test_an_empty_csv_cell_means_no_margin_but_an_empty_json_string_does_not():
    assert math.isnan(check_row(TextRow({**EXPLICIT, "margin": ""}), "f.csv:2", "explicit", COLUMNS).margin)
    assert check_row({**EXPLICIT, "margin": ""}, "f.jsonl:2", "explicit", COLUMNS).code == "bad_margin"


# ------------------------------------------------------------- class 6: whitespace and chat roles

WHITESPACE = st.text(alphabet=" \t\n\r\u00a0\u3000", min_size=1, max_size=3)


@settings(max_examples=80, deadline=None)
@given(words=st.lists(st.text(alphabet="abcxyz.,!", min_size=1, max_size=5), min_size=1, max_size=4), data=st.data())
def test_sides_that_differ_only_in_whitespace_are_bad_rows(words, data):
    chosen = " ".join(words)
    rejected = "".join(w + data.draw(WHITESPACE | st.just("")) for w in words)
    rejected = data.draw(WHITESPACE | st.just("")) + rejected
    for schema, row in (
        ("explicit", {"prompt": "p", "chosen": chosen, "rejected": rejected}),
        ("implicit", {"chosen": "Q: x A: " + chosen, "rejected": "Q: x A: " + rejected}),
        (
            "conversational",
            {
                "prompt": "p",
                "chosen": [{"role": "assistant", "content": chosen}],
                "rejected": [{"role": "assistant", "content": rejected}],
            },
        ),
    ):
        result = check_row(row, "f:1", schema, COLUMNS)
        assert isinstance(result, BadRow) and result.code in ("identical", "empty_response"), (schema, result)


def test_paris_with_a_trailing_space_is_not_a_preference():
    result = check_row({"prompt": "Capital?", "chosen": "Paris.", "rejected": "Paris. "}, "f:4", "explicit", COLUMNS)
    assert result.code == "identical" and "whitespace" in result.reason and result.field == "rejected"


@settings(max_examples=40, deadline=None)
@given(
    role=st.text(max_size=12).filter(lambda r: r not in ROLES),
    index=st.integers(0, 2),
    side=st.sampled_from(["chosen", "rejected", "prompt"]),
)
def test_an_unknown_chat_role_is_a_bad_row_naming_message_and_role(role, index, side):
    messages = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
        {"role": "tool", "content": "ok"},
    ]
    row = {"prompt": [{"role": "system", "content": "Be kind."}], "chosen": list(messages), "rejected": list(messages)}
    row["rejected"] = [*messages[:2], {"role": "assistant", "content": "Bye"}]
    row[side] = [dict(m) for m in (row[side] * 3)[: index + 1]]
    row[side][index]["role"] = role
    result = check_row(row, "f:9", "conversational", COLUMNS)
    assert isinstance(result, BadRow)
    if result.code == "bad_messages":
        assert result.field == side and f"message {index}: unknown role {role!r}" in result.reason
    else:  # a role with NUL or a lone surrogate
        assert (result.code, result.field) == ("invalid_text", f"{side}[{index}].role")


def test_every_allowed_role_is_rendered():
    row = {
        "chosen": [{"role": r, "content": f"{r} says a"} for r in ROLES],
        "rejected": [{"role": r, "content": f"{r} says b"} for r in ROLES],
    }
    assert isinstance(check_row(row, "f:1", "conversational", COLUMNS), Pair)
