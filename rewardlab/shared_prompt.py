"""Shared prompt: a decoder reads the prompt once for both responses.

Chosen and rejected begin with the same tokens (the formatted prompt). A causal backbone's hidden
states over those tokens do not depend on what follows them, so one row
`shared tokens + chosen's rest + rejected's rest`, with the rejected rest's positions restarting where
the two part and a mask that hides the chosen rest from it, gives both rewards in one pass over
fewer tokens: on long multi-turn prompts with short responses, almost half. A backbone is used this
way only where `shares_exactly` shows the packed pass gives the two-pass rewards (causal, and honouring
a 4D attention mask and position ids); a batch only where it processes fewer tokens than the two passes.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from rewardlab.checks import ConfigError
from rewardlab.data.batching import pad_sequences

log = logging.getLogger(__name__)

MASKS = {"eager": "additive", "sdpa": "boolean"}  # the 4D mask each attention implementation reads


@dataclass
class SharedBatch:
    """B rows, one per pair, and where in them each reward is read."""

    input_ids: Tensor  # (B, T)
    attention_mask: Tensor  # (B, 1, T, T), True where a token may attend
    position_ids: Tensor  # (B, T)
    read: Tensor  # (2B,) indices into the flattened (B·T) positions: chosen rewards, then rejected
    tokens: int  # B·T, the tokens the pass processes (padding included)
    real_tokens: int  # of which real: shared prompt tokens once, then each response's own


def pack(input_ids: Tensor, attention_mask: Tensor, pad_id: int = 0) -> SharedBatch:
    """The `(2B, L)` chosen-then-rejected batch as B shared rows. Each response keeps at least its last
    token of its own, so both rewards are read from tokens in their own part."""
    real = [ids[m.bool()] for ids, m in zip(input_ids, attention_mask)]
    pairs = len(real) // 2
    rows, positions, starts, chosen_ends, ends = [], [], [], [], []
    for chosen, rejected in zip(real[:pairs], real[pairs:]):
        n = min(len(chosen), len(rejected)) - 1
        shared = int((chosen[:n] == rejected[:n]).int().cumprod(0).sum()) if n > 0 else 0
        rows.append(torch.cat([chosen, rejected[shared:]]))
        positions.append(torch.cat([torch.arange(len(chosen)), torch.arange(shared, len(rejected))]))
        starts.append(shared)
        chosen_ends.append(len(chosen))
        ends.append(len(rows[-1]))
    width = max(ends)
    ids = torch.full((pairs, width), pad_id, dtype=input_ids.dtype)
    pos = torch.zeros((pairs, width), dtype=torch.long)
    for b, (row, p) in enumerate(zip(rows, positions)):
        ids[b, : len(row)], pos[b, : len(p)] = row, p
    q = torch.arange(width).view(1, -1, 1)
    k = torch.arange(width).view(1, 1, -1)
    start, chosen_end, end = (torch.tensor(v).view(-1, 1, 1) for v in (starts, chosen_ends, ends))
    allowed = (k <= q) & ((k < end) | (k == q))  # causal over real tokens; padding sees itself (no empty row)
    allowed &= ~((q >= chosen_end) & (k >= start) & (k < chosen_end))  # rejected never sees chosen's rest
    mask = allowed.unsqueeze(1)
    read = torch.tensor([b * width + e - 1 for last in (chosen_ends, ends) for b, e in enumerate(last)])
    return SharedBatch(ids, mask, pos, read, pairs * width, sum(ends))


def mask_kind(backbone: torch.nn.Module) -> str | None:
    """The 4D mask the backbone's attention implementation reads; None where it takes none."""
    return MASKS.get(getattr(backbone.config, "_attn_implementation", None))


def as_kind(allowed: Tensor, kind: str) -> Tensor:
    """A boolean 4D mask as `kind` reads it: boolean, or additive (0 where allowed, else float32's min)."""
    if kind == "boolean":
        return allowed
    return torch.zeros(allowed.shape, device=allowed.device).masked_fill(~allowed, torch.finfo(torch.float32).min)


def shares_exactly(model: Any) -> tuple[bool, str]:
    """Whether the packed pass gives the backbone's two-pass hidden states on a probe batch (random
    tokens; two pairs that part at different points), in fp32 and eval mode; and why not."""
    if model.pooling != "last":
        return False, f"pooling {model.pooling} reads every token, not the last"
    if mask_kind(model.backbone) is None or not model.pass_positions:
        return False, f"attention {getattr(model.backbone.config, '_attn_implementation', None)} takes no 4D mask"
    generator = torch.Generator().manual_seed(0)
    vocab = model.backbone.config.get_text_config().vocab_size

    def tokens(n: int) -> Tensor:
        return torch.randint(vocab, (n,), generator=generator)

    prompt = tokens(7)
    chosen = [torch.cat([prompt, tokens(3)]), torch.cat([prompt[:4], tokens(5)])]
    rejected = [torch.cat([prompt, tokens(5)]), torch.cat([prompt[:4], tokens(2)])]
    ids, mask = pad_sequences([s.numpy() for s in chosen + rejected], 0)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), torch.autocast(device_type=model.device.type, enabled=False):
            two = model.last_hidden(ids.to(model.device), mask.to(model.device))
            one = model.shared_hidden(pack(ids, mask))
    except (RuntimeError, ValueError, TypeError) as err:
        return False, f"the backbone refused a 4D mask ({type(err).__name__})"
    finally:
        model.train(was_training)
    if (one - two).abs().max() > 1e-5 * two.abs().max().clamp(min=1):  # causal: equal up to rounding
        return False, "its prompt states depend on the response (not causal)"
    return True, "causal backbone: the probe matched two passes"


def decide_sharing(model: Any, setting: bool | str) -> bool:
    """`model.share_prompt`: auto shares where the probe matches, true must match, false never."""
    ok, why = shares_exactly(model)
    if setting is True and not ok:
        raise ConfigError(
            f"model.share_prompt=true: this backbone cannot share the prompt's pass ({why}); set it to auto or false"
        )
    log.info("shared prompt: %s (%s)", "on for batches where it processes fewer tokens" if ok else "off", why)
    return ok
