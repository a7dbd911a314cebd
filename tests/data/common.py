"""Helpers shared by the data tests: column names, a datamodule over the fixtures, a BERT-style tokenizer."""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from rewardlab.data.module import PreferenceDataModule

from ..conftest import FIXTURES

COLUMNS = {
    name: name
    for name in ("prompt", "chosen", "rejected", "margin", "subset", "tie", "responses", "ranks", "scores", "response")
} | {"score": "score"}


def datamodule(tokenizer, tmp_path: Path, **overrides) -> PreferenceDataModule:
    kwargs = dict(
        train_file=str(FIXTURES / "explicit.jsonl"),
        val_file=str(FIXTURES / "explicit.json"),
        test_file=None,
        batch_size=2,
        max_tokens_per_batch=None,
        eval_batch_size=2,
        eval_max_tokens=None,
        max_length=64,
        truncation="truncate",
        schema="auto",
        format="auto",
        chat_template=None,
        columns=COLUMNS,
        on_bad_row="error",
        special_tokens_in_text="text",
        val_fraction=0.0,
        group_by_length=True,
        group_batches=50,
        padding_side="right",
        pad_to_multiple_of=None,
        max_chunks=4,
        chunk_overhead_tokens=16,
        num_workers=0,
        cache_dir=str(tmp_path / "cache"),
        report_dir=str(tmp_path / "run"),
        seed=0,
        ties="skip",
        pairs_from=None,
        pairs="all",
        min_gap=0,
        attributes=["score"],
        attribute_weights=[1.0],
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


def write(tmp_path: Path, name: str, content: str | bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return path
