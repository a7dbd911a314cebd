"""Reading, checking, formatting, truncation, caching and batching of preference pairs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from rewardlab import data as D
from rewardlab.data import BadRow, DataError, Formatter, Pair, PreferenceDataModule, check_row, read_source

from .conftest import FIXTURES

COLUMNS = {"prompt": "prompt", "chosen": "chosen", "rejected": "rejected", "margin": "margin", "subset": "subset"}


def datamodule(tokenizer, tmp_path: Path, **overrides) -> PreferenceDataModule:
    kwargs = dict(
        train_file=str(FIXTURES / "explicit.jsonl"),
        val_file=str(FIXTURES / "explicit.json"),
        test_file=None,
        batch_size=2,
        eval_batch_size=2,
        eval_max_tokens=None,
        max_length=64,
        truncation="truncate",
        schema="auto",
        format="auto",
        chat_template=None,
        columns=COLUMNS,
        on_bad_row="error",
        val_fraction=0.0,
        group_by_length=True,
        group_batches=50,
        padding_side="right",
        pad_to_multiple_of=None,
        num_workers=0,
        cache_dir=str(tmp_path / "cache"),
        report_dir=str(tmp_path / "run"),
        seed=0,
    )
    kwargs.update(overrides)
    return PreferenceDataModule(tokenizer, **kwargs)


def ready(dm: PreferenceDataModule) -> PreferenceDataModule:
    dm.prepare_data()
    dm.setup("fit")
    return dm


def bert_tokenizer() -> PreTrainedTokenizerFast:
    """A BERT-style WordPiece tokenizer ([CLS] text [SEP], no EOS), built offline."""
    words = "what is the capital of france ? paris . lyon say hello hola bonjour".split()
    vocab = {t: i for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", *words])}
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer()
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, cls_token="[CLS]", sep_token="[SEP]", pad_token="[PAD]", unk_token="[UNK]"
    )


# ---------------------------------------------------------------------------------- schemas


def test_explicit_rows_with_margin_and_subset():
    rows = list(read_source(str(FIXTURES / "explicit.jsonl"), "train"))
    assert rows[0][0] == f"{FIXTURES / 'explicit.jsonl'}:1"
    pairs = [check_row(r, w, "explicit", COLUMNS) for w, r in rows]
    assert pairs[0] == Pair("What is the capital of France?", "Paris.", "Lyon.", 2.0, "facts")
    assert pairs[1].margin == 1.0 and pairs[2].prompt == "" and math.isnan(pairs[2].margin)


def test_conversational_rows_with_and_without_prompt():
    rows = [r for _, r in read_source(str(FIXTURES / "conversational.jsonl"), "train")]
    assert [D.detect_schema(r, COLUMNS) for r in rows] == ["conversational"] * 3
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
    assert D.detect_schema(rows[0], COLUMNS) == "implicit"
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


# ---------------------------------------------------------------------------------- sources


def _explicit_rows() -> list[dict]:
    return [json.loads(line) for line in (FIXTURES / "explicit.jsonl").read_text().splitlines()]


def test_each_source_format_reads_the_same_rows(tmp_path):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = _explicit_rows()
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "b.jsonl").write_text((FIXTURES / "explicit.jsonl").read_text())
    (folder / "notes.txt").write_text("not data")
    for spec in (tmp_path / "d.parquet", tmp_path / "saved", folder):
        read = [r for _, r in read_source(str(spec), "train")]
        chosen = [check_row(r, "x", "explicit", COLUMNS).chosen for r in read]
        assert chosen == ["Paris.", "Hola.", "An answer without a prompt."]
    assert next(read_source(str(tmp_path / "d.parquet"), "train"))[0].endswith("d.parquet row 0")


def test_csv_and_json_fixtures():
    csv_rows = list(read_source(str(FIXTURES / "explicit.csv"), "train"))
    assert csv_rows[0][0].endswith("explicit.csv:2")
    first, second = (check_row(r, w, "explicit", COLUMNS) for w, r in csv_rows)
    assert (first.chosen, first.margin) == ("6", 0.5) and math.isnan(second.margin)
    json_rows = list(read_source(str(FIXTURES / "explicit.json"), "train"))
    assert json_rows[1][0].endswith("explicit.json row 1") and json_rows[1][1]["chosen"] == "No."


def test_save_to_disk_dataset_dict_picks_the_split(tmp_path):
    import datasets

    rows = _explicit_rows()
    datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(rows[:2]), "test": datasets.Dataset.from_list(rows[2:])}
    ).save_to_disk(str(tmp_path / "dd"))
    assert len(list(read_source(str(tmp_path / "dd"), "train"))) == 2
    assert len(list(read_source(f"{tmp_path / 'dd'}:test", "train"))) == 1
    with pytest.raises(DataError, match="no split 'val'"):
        list(read_source(str(tmp_path / "dd"), "val"))


def test_hub_names_are_tried_on_the_hub_and_fail_clearly_offline():
    assert D._split_spec("Anthropic/hh-rlhf:test", "train") == ("Anthropic/hh-rlhf", "test")
    assert D._split_spec("Anthropic/hh-rlhf", "train") == ("Anthropic/hh-rlhf", "train")
    with pytest.raises(DataError, match="not a local file or folder, and loading it as a hub dataset"):
        list(read_source("nobody-here/no-such-dataset", "train"))


# ---------------------------------------------------------------------------------- bad input


def _write(tmp_path: Path, name: str, content: str | bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return path


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
    path = _write(tmp_path, "train.jsonl", content)
    dm = datamodule(tiny_tokenizer, tmp_path, train_file=str(path))
    with pytest.raises(DataError, match=str(path).replace(".", r"\.") + pattern) as err:
        dm.prepare_data()
    assert "on_bad_row=skip" in str(err.value)


def test_skip_mode_counts_and_lists_every_bad_row(tmp_path, tiny_tokenizer):
    bad_lines = [c if isinstance(c, bytes) else c.encode() for c, _ in BAD_CASES.values()]
    content = b"".join(line.replace(GOOD.encode(), b"") for line in bad_lines)
    last = b'{"prompt": "q", "chosen": "c", "rejected": "d"}\n'
    path = _write(tmp_path, "train.jsonl", GOOD.encode() + content + last)
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


@pytest.mark.parametrize(
    "spec, pattern",
    [
        ("missing.jsonl", "no such file"),
        ("data.txt", "unknown format '.txt'"),
        ("empty_folder", "folder holds no data files"),
    ],
)
def test_bad_sources(spec, pattern, tmp_path, tiny_tokenizer):
    (tmp_path / "data.txt").write_text("x")
    (tmp_path / "empty_folder").mkdir()
    dm = datamodule(tiny_tokenizer, tmp_path, train_file=str(tmp_path / spec))
    with pytest.raises(DataError, match=pattern):
        dm.prepare_data()


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
    path = _write(tmp_path, "t.jsonl", '{"prompt": "p", "chosen": "x", "rejected": "x"}\n')
    dm = datamodule(tiny_tokenizer, tmp_path, train_file=str(path), on_bad_row="skip")
    dm.prepare_data()
    with pytest.raises(DataError, match="data train: no pairs left.*1 pairs read"):
        dm.setup("fit")


# ---------------------------------------------------------------------------------- formatting


def test_sep_format_is_bos_prompt_sep_response_eos(tiny_tokenizer):
    f = Formatter(tiny_tokenizer, "sep")
    head, full = f.texts("Which is larger, 3 or 4?", "4")
    assert full == "[BOS]Which is larger, 3 or 4?[SEP]4[EOS]" and full.startswith(head)
    ids = f.encode([full])[0]
    assert ids[0] == tiny_tokenizer.bos_token_id and ids[-1] == tiny_tokenizer.eos_token_id
    assert tiny_tokenizer.sep_token_id in ids and tiny_tokenizer.decode(ids) == full


def test_bert_style_tokenizer_uses_cls_and_ends_with_sep():
    tok = bert_tokenizer()
    f = Formatter(tok, "sep")
    full = f.texts("what is the capital of france?", "paris.")[1]
    assert full == "[CLS]what is the capital of france?[SEP]paris.[SEP]"
    assert f.encode([f.texts("say hello", "hola")[1]])[0] == tok("say hello", "hola")["input_ids"]
    assert D.resolve_format("auto", "explicit", tok, None) == "sep"


def test_chat_format_uses_the_template_and_auto_picks_it_for_conversations(tiny_tokenizer):
    f = Formatter(tiny_tokenizer, "chat")
    head, full = f.texts([{"role": "user", "content": "hi"}], [{"role": "assistant", "content": "yo"}])
    assert head == "[BOS]<|user|>hi[EOS]<|assistant|>" and full == "[BOS]<|user|>hi[EOS]<|assistant|>yo[EOS]"
    assert D.resolve_format("auto", "conversational", tiny_tokenizer, None) == "chat"
    assert D.resolve_format("auto", "explicit", tiny_tokenizer, None) == "sep"
    assert Formatter(tiny_tokenizer, "plain").texts("a", "b")[1] == "[BOS]ab[EOS]"


def test_tokenizer_without_pad_token_gets_one_with_a_note(caplog):
    tok = bert_tokenizer()
    tok.pad_token = None
    tok.eos_token = "[SEP]"
    with caplog.at_level("INFO"):
        D.ensure_pad_token(tok)
    assert tok.pad_token == "[SEP]" and "no pad token" in caplog.text


# ---------------------------------------------------------------------------------- truncation


def test_short_pairs_are_untouched():
    assert D.truncate([1, 5, 6, 2], [1, 5, 7, 2], 2, 1, 10) == ([1, 5, 6, 2], [1, 5, 7, 2], "", 2)


def test_long_prompt_is_cut_from_the_left_on_both_sides_keeping_bos():
    # [BOS] p1..p6 [SEP] | response [EOS]; prompt part = 8 tokens
    prompt = [1, 11, 12, 13, 14, 15, 16, 3]
    chosen, rejected = prompt + [20, 21, 2], prompt + [30, 2]
    c, r, kind, kept = D.truncate(chosen, rejected, n_prompt=8, n_protected=1, max_length=8)
    assert kind == "prompt" and kept == 5
    assert c == [1, 14, 15, 16, 3, 20, 21, 2]  # three prompt tokens cut, response intact
    assert r == [1, 14, 15, 16, 3, 30, 2]  # the same prompt cut on the other side


def test_long_response_keeps_its_end_and_eos():
    prompt = [1, 11, 3]
    chosen, rejected = prompt + list(range(40, 50)) + [2], prompt + [30, 2]
    c, r, kind, kept = D.truncate(chosen, rejected, n_prompt=3, n_protected=1, max_length=6)
    assert kind == "response" and kept == 1
    assert c == [1, 46, 47, 48, 49, 2]  # prompt gone first, then the response start; BOS and EOS stay
    assert r == [1, 30, 2]


def test_truncation_that_makes_the_sides_identical_drops_the_pair(tmp_path, tiny_tokenizer):
    tail = " and that is the whole story of it all" * 3
    rows = [
        {"prompt": "Tell me.", "chosen": "Yes" + tail, "rejected": "No" + tail},
        {"prompt": "Tell me.", "chosen": "Short.", "rejected": "Other."},
    ]
    path = _write(tmp_path, "t.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    dm = ready(datamodule(tiny_tokenizer, tmp_path, train_file=str(path), max_length=12))
    counts = dm.datasets["train"].meta["counts"]
    assert counts == {"read": 2, "used": 1, "dropped:identical_after_truncation": 1}
    bad = json.loads((tmp_path / "run" / "bad_rows.jsonl").read_text().splitlines()[0])
    assert bad["kind"] == "dropped" and bad["where"].endswith("t.jsonl:1") and bad["row"]["chosen"].startswith("Yes")
    assert "1 dropped (1 identical_after_truncation)" in D.summary_line(dm.datasets["train"].meta)


def test_drop_policy_drops_long_pairs_and_says_so(tmp_path, tiny_tokenizer):
    rows = [{"prompt": "p " * 40, "chosen": "a", "rejected": "b"}, {"prompt": "p", "chosen": "a", "rejected": "b"}]
    path = _write(tmp_path, "t.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    dm = ready(datamodule(tiny_tokenizer, tmp_path, train_file=str(path), max_length=16, truncation="drop"))
    assert dm.datasets["train"].meta["counts"] == {"read": 2, "used": 1, "dropped:too_long": 1}
    dm2 = ready(datamodule(tiny_tokenizer, tmp_path, train_file=str(path), max_length=16))
    assert dm2.datasets["train"].meta["counts"] == {"read": 2, "used": 2, "truncated:prompt": 1}
    assert max(dm2.datasets["train"].lengths) == 16


# ---------------------------------------------------------------------------------- cache and batches


def test_tokenized_once_then_served_from_the_cache(tmp_path, tiny_tokenizer, monkeypatch):
    first = ready(datamodule(tiny_tokenizer, tmp_path))
    item = first.datasets["train"][0]
    assert tiny_tokenizer.decode(item["chosen"]) == "[BOS]What is the capital of France?[SEP]Paris.[EOS]"

    def no_tokenizing(*args, **kwargs):
        raise AssertionError("tokenized again")

    monkeypatch.setattr(D, "build_cache", no_tokenizing)
    second = ready(datamodule(tiny_tokenizer, tmp_path))
    assert np.array_equal(second.datasets["train"][0]["rejected"], item["rejected"])
    assert isinstance(second.datasets["train"].ids, np.memmap)
    # a different max_length is a different cache
    with pytest.raises(AssertionError, match="tokenized again"):
        datamodule(tiny_tokenizer, tmp_path, max_length=32).prepare_data()


def test_summary_line_counts(tmp_path, tiny_tokenizer, caplog):
    with caplog.at_level("INFO"):
        ready(datamodule(tiny_tokenizer, tmp_path))
    assert "data train: 3 pairs read from" in caplog.text and "3 used; 0 truncated" in caplog.text
    assert "[schema explicit, format sep]" in caplog.text


def test_collator_pads_right_or_left_and_stacks_chosen_then_rejected():
    items = [
        {"chosen": np.array([5, 6, 7]), "rejected": np.array([8]), "margin": 1.0, "index": 0},
        {"chosen": np.array([9, 9]), "rejected": np.array([4, 4, 4, 4]), "margin": float("nan"), "index": 1},
    ]
    right = D.PairCollator(pad_id=0)(items)
    assert right["input_ids"].tolist() == [[5, 6, 7, 0], [9, 9, 0, 0], [8, 0, 0, 0], [4, 4, 4, 4]]
    assert right["attention_mask"].sum(1).tolist() == [3, 2, 1, 4]
    left = D.PairCollator(pad_id=0, padding_side="left", pad_to_multiple_of=8)(items)
    assert left["input_ids"].shape == (4, 8) and left["input_ids"][0].tolist() == [0] * 5 + [5, 6, 7]
    assert right["margin"][0] == 1.0 and math.isnan(right["margin"][1])


def test_length_grouped_batches_cover_every_pair_once_and_cut_padding():
    rng = np.random.default_rng(0)
    lengths = rng.integers(5, 500, size=1000)
    grouped = D.LengthGroupedBatchSampler(lengths, 16, shuffle=True, group_by_length=True, group_batches=50, seed=1)
    plain = D.LengthGroupedBatchSampler(lengths, 16, shuffle=True, group_by_length=False, group_batches=50, seed=1)

    def efficiency(batches):
        return sum(lengths[b].sum() for b in batches) / sum(lengths[b].max() * len(b) for b in batches)

    epoch0 = list(grouped)
    assert sorted(i for b in epoch0 for i in b) == list(range(1000)) and len(epoch0) == len(grouped) == 63
    assert efficiency(epoch0) > 0.95 > 0.7 > efficiency(list(plain))
    grouped.set_epoch(1)
    assert list(grouped) != epoch0
    grouped.set_epoch(0)
    assert list(grouped) == epoch0


def test_sampler_shards_each_batch_across_ranks():
    lengths = np.arange(10)
    ranks = [list(D.LengthGroupedBatchSampler(lengths, 4, True, True, 2, seed=3, rank=r, world_size=2)) for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == 3
    assert sorted(i for batches in ranks for b in batches for i in b) == list(range(10))
    with pytest.raises(DataError, match="batch_size=3 must divide by the world size 2"):
        D.LengthGroupedBatchSampler(lengths, 3, True, True, 2, seed=3, rank=0, world_size=2)


def test_eval_batches_are_sorted_longest_first():
    batches = list(D.LengthGroupedBatchSampler(np.array([3, 9, 1, 7]), 2, False, True, 50, seed=0))
    assert batches == [[1, 3], [0, 2]]


def test_val_fraction_holds_out_part_of_train(tmp_path, tiny_tokenizer):
    dm = ready(datamodule(tiny_tokenizer, tmp_path, val_file=None, val_fraction=0.34))
    train, val = dm.datasets["train"], dm.datasets["val"]
    assert len(train) == 2 and len(val) == 1
    assert not set(train.index) & set(val.index)


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


def test_bad_row_message_names_location_and_field():
    assert (
        BadRow("f.jsonl:3", "chosen", "empty_response", "empty response", {}).message()
        == "f.jsonl:3: field 'chosen': empty response"
    )


def test_tokenizer_fingerprint_ignores_backend_truncation_state():
    """transformers resets a backend's saved truncation/padding on first use; the cache key must not move."""
    tok = bert_tokenizer()
    tok.backend_tokenizer.enable_truncation(max_length=8)
    before = D.tokenizer_fingerprint(tok)
    tok(["what is the capital of france ?"])
    assert D.tokenizer_fingerprint(tok) == before
    tok.add_tokens(["newword"])
    assert D.tokenizer_fingerprint(tok) != before


def test_eval_batches_respect_a_token_budget():
    lengths = np.array([100, 10, 10, 10, 10, 50, 10, 10])
    sampler = D.LengthGroupedBatchSampler(lengths, 4, False, True, 50, seed=0, max_tokens=200)
    batches = list(sampler)
    assert batches[0] == [0]  # 2 sequences × 100 tokens fill the budget
    assert batches[1] == [5, 1] and batches[2] == [2, 3, 4, 6]  # 2 pairs × 2 × 50 = 200; then the cap of 4 pairs
    assert sorted(i for b in batches for i in b) == list(range(8)) and len(sampler) == len(batches) == 4
    ranked = [list(D.LengthGroupedBatchSampler(lengths, 4, False, True, 50, 0, r, 2, max_tokens=200)) for r in (0, 1)]
    assert len(ranked[0]) == len(ranked[1]) and sorted(i for rk in ranked for b in rk for i in b) == list(range(8))
