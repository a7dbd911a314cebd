"""The datamodule: every split checked before training, bad rows named or counted, held-out val."""

from __future__ import annotations

import json

import pytest

from rewardlab.data.rows import DataError

from ..conftest import FIXTURES
from .common import datamodule, ready, write

GOOD = '{"prompt": "p", "chosen": "a", "rejected": "b"}\n'

BAD_CASES = {
    "invalid_json": (GOOD + '{"prompt": "p", "chosen": \n', r":2: invalid JSON"),
    "missing_field": (GOOD + '{"prompt": "p", "chosen": "a"}\n', r":2: field 'rejected': missing"),
    "null_field": (
        GOOD + '{"prompt": "p", "chosen": null, "rejected": "b"}\n',
        r":2: field 'chosen': expected a string, got null",
    ),
    "non_string": (
        GOOD + '{"prompt": "p", "chosen": 5, "rejected": "b"}\n',
        r":2: field 'chosen': expected a string, got int",
    ),
    "empty_response": (
        GOOD + '{"prompt": "p", "chosen": "  ", "rejected": "b"}\n',
        r":2: field 'chosen': empty response",
    ),
    "identical": (
        GOOD + '{"prompt": "p", "chosen": "same", "rejected": "same"}\n',
        r":2: field 'rejected': identical to chosen",
    ),
    "bad_margin": (
        GOOD + '{"prompt": "p", "chosen": "a", "rejected": "b", "margin": "big"}\n',
        r":2: field 'margin': expected a number, got str",
    ),
    "not_object": (GOOD + '["p", "a", "b"]\n', r":2: expected an object"),
    "not_utf8": (GOOD.encode() + b'{"prompt": "\xff", "chosen": "a", "rejected": "b"}\n', r":2: not valid UTF-8"),
    "bad_messages": (
        '{"chosen": [{"role": "user"}], "rejected": [{"role": "user", "content": "x"}]}\n',
        r":1: field 'chosen': message 0: expected",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_rows_stop_before_training_naming_file_line_and_field(case, tmp_path, tiny_tokenizer):
    content, pattern = BAD_CASES[case]
    path = write(tmp_path, "train.jsonl", content)
    dm = datamodule(tiny_tokenizer, tmp_path, train_file=str(path))
    with pytest.raises(DataError, match=str(path).replace(".", r"\.") + pattern) as err:
        dm.prepare_data()
    assert "on_bad_row=skip" in str(err.value)


def test_skip_mode_counts_and_lists_every_bad_row(tmp_path, tiny_tokenizer):
    bad_lines = [c if isinstance(c, bytes) else c.encode() for c, _ in BAD_CASES.values()]
    content = b"".join(line.replace(GOOD.encode(), b"") for line in bad_lines)
    last = b'{"prompt": "q", "chosen": "c", "rejected": "d"}\n'
    path = write(tmp_path, "train.jsonl", GOOD.encode() + content + last)
    dm = ready(datamodule(tiny_tokenizer, tmp_path, train_file=str(path), on_bad_row="skip"))
    counts = dm.datasets["train"].meta["counts"]
    bad = [json.loads(line) for line in (tmp_path / "run" / "bad_rows.jsonl").read_text().splitlines()]
    assert counts["used"] == 2 and len(dm.datasets["train"]) == 2
    assert counts["read"] == counts["used"] + len(bad)  # input rows = used + skipped, always
    # the message-list row is judged by the explicit schema the first row set: its prompt is missing
    assert sorted(b["code"] for b in bad) == sorted(
        [
            "invalid_json",
            "missing_field",
            "not_a_string",
            "not_a_string",
            "empty_response",
            "identical",
            "bad_margin",
            "not_an_object",
            "not_utf8",
            "missing_field",
        ]
    )
    assert all(b["where"].startswith(str(path) + ":") and b["reason"] for b in bad)


def test_config_errors_name_the_key(tmp_path, tiny_tokenizer):
    with pytest.raises(DataError, match="data.columns: missing"):
        datamodule(tiny_tokenizer, tmp_path, columns={"prompt": "p"})
    with pytest.raises(DataError, match="data.truncation"):
        datamodule(tiny_tokenizer, tmp_path, truncation="cut").prepare_data()
    with pytest.raises(DataError, match="no validation data"):
        ready(datamodule(tiny_tokenizer, tmp_path, val_file=None))
    with pytest.raises(DataError, match="data.train_file is not set"):
        ready(datamodule(tiny_tokenizer, tmp_path, train_file=None))
    with pytest.raises(DataError, match="data.format=chat needs|conversational data needs format=chat"):
        ready(datamodule(tiny_tokenizer, tmp_path, train_file=str(FIXTURES / "conversational.jsonl"), format="sep"))


def test_dataset_empty_after_filtering_is_a_clear_error(tmp_path, tiny_tokenizer):
    path = write(tmp_path, "t.jsonl", '{"prompt": "p", "chosen": "x", "rejected": "x"}\n')
    dm = datamodule(tiny_tokenizer, tmp_path, train_file=str(path), on_bad_row="skip")
    dm.prepare_data()
    with pytest.raises(DataError, match="data train: no pairs left.*1 pairs read"):
        dm.setup("fit")


def test_summary_line_counts(tmp_path, tiny_tokenizer, caplog):
    with caplog.at_level("INFO"):
        ready(datamodule(tiny_tokenizer, tmp_path))
    assert "data train: 3 pairs read from" in caplog.text and "3 used; 0 truncated" in caplog.text
    assert "[schema explicit, format sep]" in caplog.text


def test_val_fraction_holds_out_part_of_train(tmp_path, tiny_tokenizer):
    dm = ready(datamodule(tiny_tokenizer, tmp_path, val_file=None, val_fraction=0.34))
    train, val = dm.datasets["train"], dm.datasets["val"]
    assert len(train) == 2 and len(val) == 1
    assert not set(train.index) & set(val.index)


def test_held_out_pairs_that_are_also_training_pairs_are_counted_in_a_warning(tmp_path, tiny_tokenizer, caplog):
    rows = [{"prompt": f"q{i}", "chosen": f"good {i}", "rejected": f"bad {i}"} for i in range(5)]
    train = write(tmp_path, "train.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    val = write(
        tmp_path, "val.jsonl", "".join(json.dumps(r) + "\n" for r in [rows[1], rows[3], {**rows[0], "prompt": "new"}])
    )
    with caplog.at_level("WARNING"):
        ready(datamodule(tiny_tokenizer, tmp_path, train_file=str(train), val_file=str(val)))
    assert "data val: 2 of its 3 pairs are also in the training data" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):
        ready(datamodule(tiny_tokenizer, tmp_path / "other", train_file=str(train)))
    assert "also in the training data" not in caplog.text


def test_training_batches_keep_to_max_tokens_per_batch(tmp_path, tiny_tokenizer):
    prompts = ["q " * (40 if i % 4 == 0 else 2) for i in range(64)]
    rows = [{"prompt": p, "chosen": f"yes {i}", "rejected": f"no {i}"} for i, p in enumerate(prompts)]
    path = write(tmp_path, "mixed.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    dm = ready(datamodule(tiny_tokenizer, tmp_path, train_file=str(path), batch_size=8, max_tokens_per_batch=400))
    batches = list(dm.train_dataloader())
    assert sum(b["input_ids"].shape[0] // 2 for b in batches) == 64  # every pair, once
    assert all(b["input_ids"].numel() <= 400 for b in batches)
    sizes = {b["input_ids"].shape[0] // 2 for b in batches}
    assert 8 in sizes and min(sizes) < 8  # short pairs fill a batch, long ones make smaller ones
