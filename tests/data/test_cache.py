"""The tokenized cache: built once, keyed by data, tokenizer and settings; drops counted."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from rewardlab.data import module as data_module
from rewardlab.data.cache import summary_line, tokenizer_fingerprint

from .common import bert_tokenizer, datamodule, ready, write


def test_truncation_that_makes_the_sides_identical_drops_the_pair(tmp_path, tiny_tokenizer):
    tail = " and that is the whole story of it all" * 3
    rows = [
        {"prompt": "Tell me.", "chosen": "Yes" + tail, "rejected": "No" + tail},
        {"prompt": "Tell me.", "chosen": "Short.", "rejected": "Other."},
    ]
    path = write(tmp_path, "t.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    dm = ready(datamodule(tiny_tokenizer, tmp_path, train_file=str(path), max_length=12))
    counts = dm.datasets["train"].meta["counts"]
    assert counts == {"read": 2, "used": 1, "dropped:identical_after_truncation": 1}
    bad = json.loads((tmp_path / "run" / "bad_rows.jsonl").read_text().splitlines()[0])
    assert bad["kind"] == "dropped" and bad["where"].endswith("t.jsonl:1") and bad["row"]["chosen"].startswith("Yes")
    assert "1 dropped (1 identical_after_truncation)" in summary_line(dm.datasets["train"].meta)


def test_drop_policy_drops_long_pairs_and_says_so(tmp_path, tiny_tokenizer):
    rows = [{"prompt": "p " * 40, "chosen": "a", "rejected": "b"}, {"prompt": "p", "chosen": "a", "rejected": "b"}]
    path = write(tmp_path, "t.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    dm = ready(datamodule(tiny_tokenizer, tmp_path, train_file=str(path), max_length=16, truncation="drop"))
    assert dm.datasets["train"].meta["counts"] == {"read": 2, "used": 1, "dropped:too_long": 1}
    dm2 = ready(datamodule(tiny_tokenizer, tmp_path, train_file=str(path), max_length=16))
    assert dm2.datasets["train"].meta["counts"] == {"read": 2, "used": 2, "truncated:prompt": 1}
    assert max(dm2.datasets["train"].lengths) == 16


def test_tokenized_once_then_served_from_the_cache(tmp_path, tiny_tokenizer, monkeypatch):
    first = ready(datamodule(tiny_tokenizer, tmp_path))
    item = first.datasets["train"][0]
    assert tiny_tokenizer.decode(item["chosen"]) == "[BOS]What is the capital of France?[SEP]Paris.[EOS]"

    def no_tokenizing(*args, **kwargs):
        raise AssertionError("tokenized again")

    monkeypatch.setattr(data_module, "build_cache", no_tokenizing)
    second = ready(datamodule(tiny_tokenizer, tmp_path))
    assert np.array_equal(second.datasets["train"][0]["rejected"], item["rejected"])
    assert isinstance(second.datasets["train"].ids, np.memmap)
    # a different max_length is a different cache
    with pytest.raises(AssertionError, match="tokenized again"):
        datamodule(tiny_tokenizer, tmp_path, max_length=32).prepare_data()


def test_shipped_quiz_data_is_what_the_generator_makes(tmp_path):
    from rewardlab import synthetic

    synthetic.write_splits(tmp_path, {"train": 6000, "val": 500, "test": 500})
    shipped = Path(synthetic.__file__).parent / "assets" / "quiz"
    for split in ("train", "val", "test"):
        assert (tmp_path / f"{split}.jsonl").read_text() == (shipped / f"{split}.jsonl").read_text()
    keys = {
        tuple(json.loads(line)[k] for k in ("prompt", "chosen", "rejected"))
        for split in ("train", "val", "test")
        for line in (shipped / f"{split}.jsonl").read_text().splitlines()
    }
    assert len(keys) == 7000  # no pair repeats across or within splits


def test_tokenizer_fingerprint_ignores_backend_truncation_state():
    """transformers resets a backend's saved truncation/padding on first use; the cache key must not move."""
    tok = bert_tokenizer()
    tok.backend_tokenizer.enable_truncation(max_length=8)
    before = tokenizer_fingerprint(tok)
    tok(["what is the capital of france ?"])
    assert tokenizer_fingerprint(tok) == before
    tok.add_tokens(["newword"])
    assert tokenizer_fingerprint(tok) != before
