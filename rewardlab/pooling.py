"""Which hidden state the head reads (`model.pooling`): the last real token, the mean of the real
tokens, or the first real token ([CLS]); and the position ids that make left padding harmless."""

from __future__ import annotations

import logging

import torch
from torch import Tensor
from transformers import PreTrainedModel

from rewardlab.checks import ConfigError

log = logging.getLogger(__name__)


def last_token_index(attention_mask: Tensor) -> Tensor:
    """Position of the last 1 in each row of the mask: right or left padding give the same token."""
    width = attention_mask.shape[-1]
    return width - 1 - attention_mask.flip(-1).int().argmax(-1)


def position_ids(attention_mask: Tensor) -> Tensor:
    """0, 1, 2, ... counted over real tokens only, so left padding does not shift positions."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


POOLINGS = ("last", "mean", "first")


def is_causal(backbone: PreTrainedModel) -> bool:
    """Whether a token's final state ignores the tokens after it (a decoder), probed on 6 random
    tokens with a private generator (the global random state does not move)."""
    vocab = backbone.config.get_text_config().vocab_size
    ids = torch.randint(3, max(4, min(vocab, 1000)), (1, 6), generator=torch.Generator().manual_seed(0))
    ids = ids.to(backbone.device)
    was_training = backbone.training
    backbone.eval()
    with torch.no_grad():
        full = backbone(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state[:, :3]
        part = backbone(input_ids=ids[:, :3], attention_mask=torch.ones_like(ids[:, :3])).last_hidden_state
    backbone.train(was_training)
    return bool((full - part).abs().max() <= 1e-5 * part.abs().max().clamp(min=1))


def choose_pooling(backbone: PreTrainedModel, pooling: str) -> str:
    """`model.pooling`: auto reads the last real token of a decoder (the one that has seen the whole
    text) and the first of an encoder ([CLS], trained to sum up the text: for MiniLM on the development
    pairs the best of last, mean and first; see docs/BENCHMARKS.md)."""
    if pooling == "auto":
        pooling = "last" if is_causal(backbone) else "first"
        log.info("pooling auto: %s (%s backbone)", pooling, "causal" if pooling == "last" else "bidirectional")
    if pooling not in POOLINGS:
        raise ConfigError(f"model.pooling: expected auto or one of {', '.join(POOLINGS)}, got {pooling!r}")
    return pooling


def pool(hidden: Tensor, attention_mask: Tensor, pooling: str) -> Tensor:
    """One state per sequence, `(N, hidden)`, from the final hidden states `(N, L, hidden)`."""
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    if pooling == "mean":
        weights = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * weights).sum(1) / weights.sum(1)
    if pooling == "first":
        return hidden[rows, attention_mask.int().argmax(-1)]
    return hidden[rows, last_token_index(attention_mask)]
