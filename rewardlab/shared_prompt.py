"""Shared prompt: a decoder reads the prompt once for both responses (or all K of a ranking).

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
    """One row per group of sequences that share a prompt (a pair, or a ranking's K responses), and where
    in them each sequence's reward is read."""

    input_ids: Tensor  # (G, T)
    attention_mask: Tensor  # (G, 1, T, T), True where a token may attend
    position_ids: Tensor  # (G, T)
    read: Tensor  # (N,) indices into the flattened (G·T) positions, in the batch's sequence order
    tokens: int  # G·T, the tokens the pass processes (padding included)
    real_tokens: int  # of which real: shared prompt tokens once, then each response's own


def pack(
    input_ids: Tensor, attention_mask: Tensor, groups: list[list[int]] | None = None, pad_id: int = 0
) -> SharedBatch:
    """The batch's sequences as one row per group (default: the pairs of a `(2B, L)` chosen-then-rejected
    batch): the first sequence whole, then each other's rest after the prefix all of them share, whose
    positions restart where they part and which sees only the shared prefix and itself. Each sequence
    keeps at least its last token of its own, so every reward is read from a token in its own part."""
    real = [ids[m.bool()] for ids, m in zip(input_ids, attention_mask)]
    if groups is None:
        half = len(real) // 2
        groups = [[b, b + half] for b in range(half)]
    rows, positions, segments, shared_lengths, reads = [], [], [], [], [(0, 0)] * len(real)
    for g, members in enumerate(groups):
        seqs = [real[i] for i in members]
        n = min(len(s) for s in seqs) - 1
        alike = [s[:n] == seqs[0][:n] for s in seqs[1:]]
        same = torch.stack(alike).all(0) if n > 0 and alike else torch.zeros(0, dtype=torch.bool)
        shared = int(same.int().cumprod(0).sum())
        parts = [seqs[0]] + [s[shared:] for s in seqs[1:]]
        rows.append(torch.cat(parts))
        positions.append(torch.cat([torch.arange(len(seqs[0]))] + [torch.arange(shared, len(s)) for s in seqs[1:]]))
        segments.append(torch.cat([torch.full((len(p),), j) for j, p in enumerate(parts)]))
        shared_lengths.append(shared)
        end = 0
        for i, part in zip(members, parts):
            end += len(part)
            reads[i] = (g, end - 1)
    width = max(len(row) for row in rows)
    ids = torch.full((len(groups), width), pad_id, dtype=input_ids.dtype)
    pos = torch.zeros((len(groups), width), dtype=torch.long)
    seg = torch.full((len(groups), width), -1, dtype=torch.long)
    for g, (row, p, s) in enumerate(zip(rows, positions, segments)):
        ids[g, : len(row)], pos[g, : len(p)], seg[g, : len(s)] = row, p, s
    q = torch.arange(width).view(1, -1, 1)
    k = torch.arange(width).view(1, 1, -1)
    shared = torch.tensor(shared_lengths).view(-1, 1, 1)
    seg_q, seg_k = seg.unsqueeze(2), seg.unsqueeze(1)
    # causal over real tokens, within a token's own part or the shared prefix; padding sees itself (no empty row)
    allowed = ((k <= q) & (seg_k >= 0) & ((seg_k == seg_q) | (k < shared))) | (k == q)
    read = torch.tensor([g * width + e for g, e in reads])
    return SharedBatch(ids, allowed.unsqueeze(1), pos, read, len(groups) * width, sum(len(r) for r in rows))


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
