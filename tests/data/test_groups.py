"""Richer preference data: ties in pairs, rankings of K responses, ratings (one score or several attributes),
the pairs made of them, and the groups a listwise or pointwise loss trains on."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from rewardlab.data.batching import LengthGroupedBatchSampler
from rewardlab.data.groups import Group, check_ranking, check_rating, group_pairs, read_groups
from rewardlab.data.rows import BadRow, DataError, TextRow, check_row

from ..conftest import FIXTURES
from .common import COLUMNS, datamodule, ready, write

RANKING = {"prompt": "p", "responses": ["a", "b", "c"], "ranks": [2, 1, 3]}
ATTRIBUTES = {"helpful": 1.0, "concise": 0.5}


def lines(tmp_path: Path, name: str, rows: list) -> str:
    return str(write(tmp_path, name, "".join(json.dumps(r) + "\n" for r in rows)))


def test_a_ranking_becomes_a_group_whose_scores_order_its_responses():
    group = check_ranking(RANKING, "f:1", 0, COLUMNS)
    assert group.scores == [-2.0, -1.0, -3.0] and group.responses == ["a", "b", "c"] and group.attributes is None
    scored = check_ranking({**RANKING, "ranks": None, "scores": [0.5, "2", 1]} | {"ranks": None}, "f:1", 0, COLUMNS)
    assert isinstance(scored, BadRow) and scored.code == "no_order"  # a null ranks field still counts as given
    scored = check_ranking({"prompt": "p", "responses": ["a", "b"], "scores": [0.5, "2"]}, "f:1", 0, COLUMNS)
    assert scored.scores == [0.5, 2.0]


@pytest.mark.parametrize(
    "change, field, code",
    [
        ({"ranks": [1, 2]}, "ranks", "bad_order"),
        ({"ranks": [1, "first", 3]}, "ranks[1]", "bad_score"),
        ({"ranks": [1, None, 3]}, "ranks[1]", "bad_score"),
        ({"ranks": [1, True, 3]}, "ranks[1]", "bad_score"),
        ({"ranks": [1, float("nan"), 3]}, "ranks[1]", "bad_score"),
        ({"scores": [1e308, -1e308, 0], "ranks": None}, "ranks", "no_order"),
        ({"ranks": [1, 1e31, 3]}, "ranks[1]", "bad_score"),
        ({"responses": ["only one"], "ranks": [1]}, "responses", "too_few_responses"),
        ({"responses": "a b c"}, "responses", "too_few_responses"),
        ({"responses": ["a", " ", "c"]}, "responses[1]", "empty_response"),
        ({"responses": ["a", "b", "a "]}, "responses[2]", "identical"),
        ({"responses": ["a", 7, "c"]}, "responses[1]", "not_a_string"),
        ({"scores": [1, 2, 3]}, "ranks", "no_order"),
        ({"prompt": 5}, "prompt", "not_a_string"),
    ],
)
def test_a_bad_ranking_is_a_bad_row_naming_its_field(change, field, code):
    bad = check_ranking({**RANKING, **change}, "f:3", 2, COLUMNS)
    assert isinstance(bad, BadRow) and (bad.field, bad.code) == (field, code) and bad.where == "f:3"
    missing = check_ranking({k: v for k, v in RANKING.items() if k != "ranks"}, "f:3", 2, COLUMNS)
    assert missing.code == "no_order" and "exactly one of 'ranks'" in missing.reason


@pytest.mark.parametrize(
    "row, field, code",
    [
        ({"scores": {"helpful": 3, "concise": 2, "funny": 9}}, "scores.funny", "unknown_attribute"),
        ({"scores": {"helpful": 3}}, "scores.concise", "missing_attribute"),
        ({"scores": {"helpful": "x", "concise": 2}}, "scores.helpful", "bad_score"),
        ({"score": 3}, "score", "one_score"),
        ({"score": 3, "scores": {"helpful": 3, "concise": 2}}, "score", "two_scores"),
        ({"scores": [3, 2]}, "scores", "no_score"),
        ({}, "scores", "no_score"),
    ],
)
def test_a_bad_rating_is_a_bad_row_naming_its_field(row, field, code):
    bad = check_rating({"prompt": "p", "response": "r", **row}, "f:2", COLUMNS, ATTRIBUTES)
    assert isinstance(bad, BadRow) and (bad.field, bad.code) == (field, code)
    assert "helpful" in bad.reason or code in ("bad_score", "two_scores")


def test_ratings_of_one_prompt_form_one_group_in_reading_order_and_a_second_rating_is_refused():
    rows = [json.loads(line) for line in (FIXTURES / "ratings.jsonl").read_text().splitlines()]
    rows.append({"prompt": "Say hello in Spanish.", "response": " Hola. ", "scores": {"helpful": 1, "concise": 1}})
    found = list(read_groups(((f"r:{i + 1}", r) for i, r in enumerate(rows)), "ratings", COLUMNS, ATTRIBUTES))
    groups = [g for _, g in found if isinstance(g, Group)]
    bad = [g for _, g in found if isinstance(g, BadRow)]
    assert [len(g.responses) for g in groups] == [3, 2, 1]
    france = groups[0]
    assert france.responses[2] == "It is Paris, the largest city of France."
    assert france.scores == [9 + 0.5 * 8, 2 + 0.5 * 8, 9 + 0.5 * 4] and france.attributes[1] == [2.0, 8.0]
    assert france.rows == [0, 2, 3] and france.where == ["r:1", "r:3", "r:4"]
    assert len(bad) == 1 and bad[0].code == "rated_twice" and "r:2" in bad[0].reason


def test_pairs_of_a_group_all_or_adjacent_with_the_gap_as_margin_ties_and_min_gap_counted():
    group = Group("p", ["a", "b", "c", "d"], [3.0, 1.0, 3.0, 2.5], None, ["w:a", "w:b", "w:c", "w:d"], [0, 1, 2, 3], "")
    counts: Counter = Counter()
    made = [(p.chosen, p.rejected, p.margin, p.tie) for p, _, _ in group_pairs(group, "all", 0.0, "skip", counts)]
    assert made == [("a", "b", 2.0, False), ("a", "d", 0.5, False), ("c", "b", 2.0, False),
                    ("d", "b", 1.5, False), ("c", "d", 0.5, False)]  # fmt: skip
    assert counts == {"not_paired:equal_scores": 1}
    counts.clear()
    made = [(p.chosen, p.rejected, p.tie) for p, _, _ in group_pairs(group, "all", 1.0, "keep", counts)]
    assert ("a", "c", True) in made and len(made) == 4 and counts == {"not_paired:under_min_gap": 2}
    adjacent = [(p.chosen, p.rejected, p.margin) for p, _, _ in group_pairs(group, "adjacent", 0.0, "keep", Counter())]
    assert adjacent == [("a", "c", 0.0), ("c", "d", 0.5), ("d", "b", 1.5)]
    where = [w for _, w, _ in group_pairs(group, "adjacent", 0.0, "skip", Counter())]
    assert where == ["w:c over w:d", "w:d over w:b"]


@pytest.mark.parametrize("value, expected", [(True, True), (False, False), (None, False), ("true", "bad"), (1, "bad")])
def test_the_tie_field_is_true_or_false_only(value, expected):
    row = {"prompt": "p", "chosen": "a", "rejected": "b", "tie": value}
    pair = check_row(row, "f:1", "explicit", COLUMNS)
    assert (
        (pair.code == "bad_tie" and "expected true or false" in pair.reason)
        if expected == "bad"
        else pair.tie is expected
    )
    text = check_row(TextRow(prompt="p", chosen="a", rejected="b", tie=" TRUE ", margin=""), "f:2", "explicit", COLUMNS)
    assert text.tie is True


def test_ties_are_skipped_and_counted_or_kept_and_counted(tmp_path, tiny_tokenizer):
    skip = ready(datamodule(tiny_tokenizer, tmp_path / "a", train_file=str(FIXTURES / "ties.jsonl")))
    assert skip.datasets["train"].meta["counts"] == {"read": 4, "used": 2, "dropped:tie": 2}
    lists = ready(
        datamodule(tiny_tokenizer, tmp_path / "l", train_file=str(FIXTURES / "ties.jsonl"), train_unit="lists")
    )
    assert lists.lists["train"].meta["counts"]["dropped:tie"] == 2  # pairs read as groups of two drop them too
    for run in ("a", "l"):  # and both list each dropped tie by its line
        listed = [json.loads(line) for line in (tmp_path / run / "run" / "bad_rows.jsonl").read_text().splitlines()]
        assert [(r["where"].rsplit(":", 1)[1], r["code"]) for r in listed] == [("2", "tie"), ("4", "tie")], run
    keep = ready(datamodule(tiny_tokenizer, tmp_path / "b", train_file=str(FIXTURES / "ties.jsonl"), ties="keep"))
    assert keep.ties_in("train") == 2 and keep.datasets["train"].tie.tolist() == [False, True, False, True]
    batch = keep.collator([keep.datasets["train"][i] for i in range(4)])
    assert batch["tie"].tolist() == [False, True, False, True]


def test_rankings_become_pairs_with_pairs_from_and_every_count_is_reported(tmp_path, tiny_tokenizer, caplog):
    rankings = str(FIXTURES / "rankings.jsonl")
    with pytest.raises(DataError, match="holds rankings, and this loss trains on pairs: set data.pairs_from=rankings"):
        ready(datamodule(tiny_tokenizer, tmp_path / "a", train_file=rankings))
    with pytest.raises(DataError, match="holds rankings, .* set data.pairs_from=rankings"):
        ready(datamodule(tiny_tokenizer, tmp_path / "b", train_file=rankings, pairs_from="ratings"))
    caplog.set_level("INFO")
    dm = ready(datamodule(tiny_tokenizer, tmp_path / "c", train_file=rankings, pairs_from="rankings"))
    train = dm.datasets["train"]
    assert train.meta["counts"] == {"read": 3, "made": 9, "used": 9, "not_paired:equal_scores": 1}
    assert train.margin.tolist() == [1, 2, 3, 1, 2, 1, 7, 7, 1]  # rank gaps, then score gaps
    assert (
        "3 rankings rows read from" in caplog.text
        and "9 pairs made of them (1 not made: 1 equal_scores)" in caplog.text
    )


def test_a_listwise_loss_trains_on_whole_groups_and_a_batch_holds_every_response(tmp_path, tiny_tokenizer, caplog):
    dm = ready(datamodule(tiny_tokenizer, tmp_path, train_file=str(FIXTURES / "rankings.jsonl"), train_unit="lists"))
    groups = dm.lists["train"]
    assert groups.sizes.tolist() == [4, 3, 2] and "train" not in dm.datasets  # no pairs tokenized for training
    assert groups.scores.tolist() == [-1, -2, -3, -4, 9, 2, 2, -1, -2]
    batch = dm.list_collator([groups[i] for i in range(3)])
    assert batch["group"].tolist() == [0, 0, 0, 0, 1, 1, 1, 2, 2] and batch["input_ids"].shape[0] == 9
    assert batch["index"].tolist() == [0, 1, 2] and batch["targets"].shape == (9, 0)
    loader = dm.train_dataloader()  # batch_size 2 pairs: at most 4 responses per batch, whole groups
    assert sorted(len(b["index"]) for b in loader) == [1, 1, 1]
    small = datamodule(tiny_tokenizer, tmp_path / "s", train_file=str(FIXTURES / "rankings.jsonl"), train_unit="lists",
                       batch_size=1)  # fmt: skip
    with caplog.at_level("WARNING"):
        ready(small)
    assert "data train: 2 prompts hold more than 2 × data.batch_size = 2 responses (up to 4)" in caplog.text
    caplog.clear()
    tail = " one two three four five six seven eight"  # truncation keeps a response's end: the two become one
    one = {"prompt": "q", "responses": ["yes" + tail, "no" + tail], "ranks": [1, 2]}
    with caplog.at_level("INFO"):
        path = lines(tmp_path, "o.jsonl", [RANKING, one])
        ready(datamodule(tiny_tokenizer, tmp_path / "o", train_file=path, train_unit="lists", max_length=8))
    assert "data train: 1 prompts left out, with fewer than 2 responses" in caplog.text
    assert [len(b["index"]) for b in small.train_dataloader()] == [1, 1, 1]  # each whole, one per batch
    with pytest.raises(DataError, match="val_fraction holds out pairs"):
        ready(datamodule(tiny_tokenizer, tmp_path / "v", train_file=str(FIXTURES / "rankings.jsonl"), val_file=None,
                         val_fraction=0.5, train_unit="lists"))  # fmt: skip


def test_regression_reads_ratings_with_their_attributes_and_refuses_other_data(tmp_path, tiny_tokenizer):
    ratings = str(FIXTURES / "ratings.jsonl")
    kw = dict(train_file=ratings, val_file=ratings, test_file=ratings, train_unit="points",
              attributes=["helpful", "concise"], attribute_weights=[1.0, 0.5])  # fmt: skip
    dm = ready(datamodule(tiny_tokenizer, tmp_path / "a", **kw))
    assert dm.lists["train"].targets.tolist() == [[9, 8], [2, 8], [9, 4], [8, 9], [1, 9], [9, 9]]
    assert dm.lists["test"].sizes.tolist() == [3, 2, 1]  # regression is also scored per response on test
    assert dm.datasets["val"].meta["counts"]["made"] == 4  # validation: the pairs of its ratings
    with pytest.raises(DataError, match="loss=regression fits ratings, but .* holds rankings"):
        ready(datamodule(tiny_tokenizer, tmp_path / "b", **(kw | {"train_file": str(FIXTURES / "rankings.jsonl")})))
    with pytest.raises(DataError, match="unknown attribute 'helpful'"):
        ready(datamodule(tiny_tokenizer, tmp_path / "c", **(kw | {"attributes": ["score"], "attribute_weights": [1]})))
    with pytest.raises(DataError, match="attribute_weights=\\[1.0\\]: expected one finite number per attribute"):
        datamodule(tiny_tokenizer, tmp_path / "d", **(kw | {"attribute_weights": [1.0]}))


def test_one_split_holds_one_kind_of_row(tmp_path, tiny_tokenizer):
    folder = tmp_path / "mixed"
    folder.mkdir()
    lines(folder, "a.jsonl", [RANKING])
    lines(folder, "b.jsonl", [{"prompt": "p", "chosen": "a", "rejected": "b"}])
    with pytest.raises(DataError, match="one kind of row: .*a.jsonl holds rankings, .*b.jsonl holds pairs"):
        ready(datamodule(tiny_tokenizer, tmp_path, train_file=str(folder), pairs_from="rankings"))


def test_a_pair_row_in_a_rankings_file_is_a_bad_row_with_the_count(tmp_path, tiny_tokenizer):
    path = lines(
        tmp_path, "r.jsonl", [RANKING, RANKING | {"prompt": "q"}, {"prompt": "p", "chosen": "a", "rejected": "b"}]
    )
    dm = ready(datamodule(tiny_tokenizer, tmp_path, train_file=path, pairs_from="rankings", on_bad_row="skip"))
    assert dm.datasets["train"].meta["counts"]["skipped:wrong_kind"] == 1
    with pytest.raises(DataError, match="r.jsonl:3: this file holds rankings, this row looks pairs"):
        ready(datamodule(tiny_tokenizer, tmp_path / "e", train_file=path, pairs_from="rankings"))


def test_groups_fill_a_batch_up_to_the_sequences_of_batch_size_pairs():
    lengths, sizes = np.array([5, 5, 5, 5]), np.array([3, 2, 5, 1])
    sampler = LengthGroupedBatchSampler(lengths, 2, False, False, 1, 0, sizes=sizes)
    assert [b.tolist() for b in sampler.batches()] == [[0], [1], [2], [3]]  # 3 + 2 > 4 sequences, 5 alone
    sampler = LengthGroupedBatchSampler(lengths, 4, False, False, 1, 0, sizes=sizes)
    assert [b.tolist() for b in sampler.batches()] == [[0, 1], [2, 3]] and len(sampler) == 2
    assert torch.equal(torch.tensor([len(b) for b in sampler.batches()]), torch.tensor([2, 2]))


def test_a_pair_row_with_extra_response_columns_stays_a_pair_and_ratings_group_across_a_folders_files(
    tmp_path, tiny_tokenizer
):
    path = lines(tmp_path, "p.jsonl", [{"prompt": "Q", "chosen": "good", "rejected": "bad", "response": "x"}])
    dm = ready(datamodule(tiny_tokenizer, tmp_path / "a", train_file=path))
    assert dm.datasets["train"].meta["counts"] == {"read": 1, "used": 1}
    folder = tmp_path / "ratings"
    folder.mkdir()
    lines(
        folder, "1.jsonl", [{"prompt": "Q", "response": "a", "score": 1}, {"prompt": "R", "response": "r1", "score": 1}]
    )
    lines(
        folder, "2.jsonl", [{"prompt": "Q", "response": "b", "score": 5}, {"prompt": "S", "response": "s", "score": 4}]
    )
    dm = ready(datamodule(tiny_tokenizer, tmp_path / "b", train_file=str(folder), pairs_from="ratings"))
    train = dm.datasets["train"]
    assert train.meta["counts"] == {"read": 4, "made": 1, "used": 1, "not_paired:single_response": 2}
    assert (train.margin.tolist(), train.pair_keys([0])) == ([4.0], ["3>1"])  # rows across files, 1-based
    with pytest.raises(DataError, match="val_fraction holds out pairs, but this training data is made of rankings"):
        ready(datamodule(tiny_tokenizer, tmp_path / "c", train_file=str(folder), pairs_from="ratings", val_file=None,
                         val_fraction=0.5))  # fmt: skip


def test_responses_identical_once_truncated_leave_their_group_counted_and_named(tmp_path, tiny_tokenizer):
    tail = " one two three four five six seven eight"
    row = {"prompt": "why", "responses": ["yes" + tail, "no" + tail, "maybe", "why not"], "ranks": [1, 2, 3, 4]}
    path = lines(tmp_path, "r.jsonl", [row])
    dm = ready(datamodule(tiny_tokenizer, tmp_path, train_file=path, train_unit="lists", max_length=8))
    groups = dm.lists["train"]
    assert groups.sizes.tolist() == [2] and groups.scores.tolist() == [-3, -4]  # "maybe" and "why not" stay
    counts = groups.meta["counts"]
    assert counts["dropped:identical_after_truncation"] == 2 and counts["used"] == 2
    dropped = [json.loads(line) for line in (tmp_path / "run" / "bad_rows.jsonl").read_text().splitlines()]
    assert [(d["code"], d["reason"]) for d in dropped] == [
        ("identical_after_truncation", "identical to response 1 once truncated to max_length=8, scored otherwise"),
        ("identical_after_truncation", "identical to response 0 once truncated to max_length=8, scored otherwise"),
    ]
    whole = ready(datamodule(tiny_tokenizer, tmp_path / "w", train_file=path, train_unit="lists", max_length=64))
    assert whole.lists["train"].sizes.tolist() == [4]  # not truncated: all four differ
    tied = lines(tmp_path, "t.jsonl", [row | {"ranks": [1, 1, 2, 3]}])  # the copies agree: the first stays
    dm = ready(datamodule(tiny_tokenizer, tmp_path / "t", train_file=tied, train_unit="lists", max_length=8))
    assert dm.lists["train"].scores.tolist() == [-1, -2, -3]
    assert dm.lists["train"].meta["counts"]["dropped:identical_after_truncation"] == 1
    folder = tmp_path / "ratings"  # ratings grouped across files: the other copy is named by its file and line
    folder.mkdir()
    why = [{"prompt": "why", "response": r, "score": n} for n, r in enumerate(["yes" + tail, "no" + tail, "maybe"])]
    lines(folder, "1.jsonl", [why[0], {"prompt": "what", "response": "a", "score": 1}])
    lines(folder, "2.jsonl", [why[1], why[2], {"prompt": "what", "response": "b", "score": 2}])
    dm = ready(datamodule(tiny_tokenizer, tmp_path / "r", train_file=str(folder), train_unit="lists", max_length=8))
    assert dm.lists["train"].sizes.tolist() == [2]  # "why" keeps one response: no comparison left
    reasons = [json.loads(r)["reason"] for r in (tmp_path / "r" / "run" / "bad_rows.jsonl").read_text().splitlines()]
    assert (
        reasons[0]
        == f"identical to the response of {folder / '2.jsonl'}:1 once truncated to max_length=8, scored otherwise"
    )
