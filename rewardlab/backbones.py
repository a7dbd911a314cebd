"""Backbones: a pretrained `transformers` model (hub name or local folder) or a tiny random one.

Every builder returns a `Backbone`: the bare transformer (`AutoModel`, no LM or classification
head) and its tokenizer. The reward head lives in `rewardlab.model`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    AutoConfig,
    AutoModel,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

from rewardlab import synthetic

log = logging.getLogger(__name__)

TINY_TOKENIZER = Path(__file__).parent / "assets" / "tiny-tokenizer"
TINY_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<|{{ message['role'] }}|>{{ message['content'] }}"
    "{{ eos_token }}{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


@dataclass
class Backbone:
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase


def _dtype(name: str | None) -> torch.dtype | None:
    return None if name in (None, "auto") else getattr(torch, name)


def pretrained(
    name_or_path: str,
    dtype: str | None = "float32",
    attn_implementation: str | None = None,
    trust_remote_code: bool = False,
    revision: str | None = None,
    tokenizer_name_or_path: str | None = None,
) -> Backbone:
    """Load `AutoModel` and `AutoTokenizer` from a hub name (online) or a local folder."""
    if name_or_path.startswith((".", "/", "~")) and not Path(name_or_path).expanduser().exists():
        raise FileNotFoundError(f"backbone.name_or_path: no such folder {name_or_path!r}")
    tokenizer = AutoTokenizer.from_pretrained(
        tokenizer_name_or_path or name_or_path, revision=revision, trust_remote_code=trust_remote_code
    )
    model = AutoModel.from_pretrained(
        name_or_path,
        dtype=_dtype(dtype),
        attn_implementation=attn_implementation,
        trust_remote_code=trust_remote_code,
        revision=revision,
    )
    return Backbone(model, tokenizer)


def tiny(
    family: str,
    hidden_size: int,
    num_layers: int,
    num_heads: int,
    intermediate_size: int,
    max_positions: int,
    dropout: float,
    initializer_range: float = 0.02,
    tokenizer_path: str | None = None,
) -> Backbone:
    """A randomly initialised model of `family` (llama, gpt2, bert, ...) built from a config.

    Needs no download: the tokenizer is the small byte-level BPE shipped with rewardlab (or any
    tokenizer folder given as `tokenizer_path`). Seed before calling for identical weights.
    """
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path or TINY_TOKENIZER)
    config = AutoConfig.for_model(
        family,
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        intermediate_size=intermediate_size,
        max_position_embeddings=max_positions,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        initializer_range=initializer_range,
    )
    for name in (
        "hidden_dropout_prob",
        "attention_probs_dropout_prob",
        "resid_pdrop",
        "embd_pdrop",
        "attn_pdrop",
        "attention_dropout",
        "dropout",
    ):
        if hasattr(config, name):
            setattr(config, name, dropout)
    if family == "gpt2":
        config.n_inner = intermediate_size
    return Backbone(AutoModel.from_config(config), tokenizer)


def build_tiny_tokenizer(out_dir: Path, vocab_size: int = 1024) -> PreTrainedTokenizerFast:
    """Train the tiny byte-level BPE on the synthetic corpus (how `assets/tiny-tokenizer` was made).

    Byte-level means any text encodes losslessly, so random or non-English test input never
    collapses to unknown tokens.
    """
    specials = ["[PAD]", "[BOS]", "[EOS]", "[SEP]", "<|system|>", "<|user|>", "<|assistant|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    texts = []
    for row in synthetic.pairs(20000, seed=1234, long_tail=True):
        texts += [row["prompt"], row["chosen"], row["rejected"]]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(texts, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="[BOS] $A", pair="[BOS] $A [SEP] $B", special_tokens=[("[BOS]", 1), ("[SEP]", 3)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="[PAD]",
        bos_token="[BOS]",
        eos_token="[EOS]",
        sep_token="[SEP]",
        additional_special_tokens=specials[4:],
        chat_template=TINY_CHAT_TEMPLATE,
        model_max_length=4096,
    )
    fast.save_pretrained(out_dir)
    return fast


if __name__ == "__main__":
    build_tiny_tokenizer(TINY_TOKENIZER)
