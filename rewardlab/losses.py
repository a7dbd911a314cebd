"""Pairwise losses. Each takes the rewards of chosen and rejected (shape `(B,)`) and the per-pair
`margin` (NaN where the data has none) and returns the mean loss over the batch. A loss that reads
the margin says so with `needs_margin`, and the run checks every pair has one before training."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def bradley_terry(chosen: Tensor, rejected: Tensor, margin: Tensor) -> Tensor:
    """-log σ(r_w − r_l): the negative log-likelihood of the preference under Bradley–Terry."""
    return -F.logsigmoid(chosen - rejected).mean()


def bradley_terry_margin(chosen: Tensor, rejected: Tensor, margin: Tensor) -> Tensor:
    """-log σ(r_w − r_l − m): the chosen response must win by at least the pair's margin m
    (e.g. the gap between two ratings), as in Llama 2's reward models."""
    return -F.logsigmoid(chosen - rejected - margin).mean()


bradley_terry_margin.needs_margin = True


def centered(chosen: Tensor, rejected: Tensor, margin: Tensor, coefficient: float) -> Tensor:
    """Bradley–Terry + c · mean((r_w + r_l)²): BT only sees differences, so rewards can drift; the
    penalty keeps them centred on zero (TRL's `center_rewards_coefficient`)."""
    return bradley_terry(chosen, rejected, margin) + coefficient * (chosen + rejected).square().mean()


def label_smoothing(chosen: Tensor, rejected: Tensor, margin: Tensor, epsilon: float) -> Tensor:
    """Conservative Bradley–Terry: each label is wrong with probability ε, so the loss is
    −(1−ε) log σ(d) − ε log σ(−d) and no longer rewards pushing margins to infinity."""
    d = chosen - rejected
    return (-(1 - epsilon) * F.logsigmoid(d) - epsilon * F.logsigmoid(-d)).mean()
