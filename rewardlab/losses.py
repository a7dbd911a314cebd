"""Pairwise losses: small classes called with the rewards of chosen and rejected (shape `(B,)`) and
each pair's `margin` (NaN where the data has none), returning the mean loss over the batch; `pairwise`
gives each pair's loss (any matching shapes, elementwise), which `head=ensemble` weighs per head. A loss
that reads margins says so with `needs_margin = True`, and the run checks every pair has one before
training. Any callable with the `__call__` signature works as a loss of your own (with `head=linear`
or `head=odin`)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


class Loss:
    """The interface of rewardlab's losses: `pairwise` per pair, called for its mean."""

    needs_margin = False

    def pairwise(self, chosen: Tensor, rejected: Tensor, margin: Tensor) -> Tensor:
        raise NotImplementedError

    def __call__(self, chosen: Tensor, rejected: Tensor, margin: Tensor) -> Tensor:
        return self.pairwise(chosen, rejected, margin).mean()


class BradleyTerry(Loss):
    """-log σ(r_w − r_l): the negative log-likelihood of the preference under Bradley–Terry."""

    def pairwise(self, chosen: Tensor, rejected: Tensor, margin: Tensor) -> Tensor:
        return -F.logsigmoid(chosen - rejected)


class MarginBradleyTerry(Loss):
    """-log σ(r_w − r_l − m): the chosen response must win by at least the pair's margin m (e.g. the
    gap between two ratings), as in Llama 2's reward models."""

    needs_margin = True

    def pairwise(self, chosen: Tensor, rejected: Tensor, margin: Tensor) -> Tensor:
        return -F.logsigmoid(chosen - rejected - margin)


class Centered(Loss):
    """Bradley–Terry + c · (r_w + r_l)² per pair: BT only sees differences, so rewards can drift; the
    penalty keeps them centred on zero (TRL's `center_rewards_coefficient`)."""

    def __init__(self, coefficient: float):
        self.coefficient = coefficient

    def pairwise(self, chosen: Tensor, rejected: Tensor, margin: Tensor) -> Tensor:
        return -F.logsigmoid(chosen - rejected) + self.coefficient * (chosen + rejected).square()


class LabelSmoothing(Loss):
    """Conservative Bradley–Terry: each label is wrong with probability ε, so the loss is
    −(1−ε) log σ(d) − ε log σ(−d) and no longer rewards pushing margins to infinity."""

    def __init__(self, epsilon: float):
        self.epsilon = epsilon

    def pairwise(self, chosen: Tensor, rejected: Tensor, margin: Tensor) -> Tensor:
        d = chosen - rejected
        return -(1 - self.epsilon) * F.logsigmoid(d) - self.epsilon * F.logsigmoid(-d)
