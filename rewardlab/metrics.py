"""Epoch metrics of a reward model's pairs."""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric


class PairMetrics(Metric):
    """Loss, strict accuracy (a tie is wrong), margin, reward means and spread over an epoch;
    sums, so they are exact over any batching and reduce across devices."""

    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        for name in ("pairs", "loss", "correct", "margin", "chosen", "rejected", "square"):
            self.add_state(name, default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, chosen: Tensor, rejected: Tensor, loss: Tensor) -> None:
        chosen, rejected = chosen.double(), rejected.double()
        self.pairs += chosen.numel()
        self.loss += loss.double() * chosen.numel()
        self.correct += (chosen > rejected).sum()
        self.margin += (chosen - rejected).sum()
        self.chosen += chosen.sum()
        self.rejected += rejected.sum()
        self.square += (chosen.square() + rejected.square()).sum()

    def compute(self) -> dict[str, Tensor]:
        n = self.pairs.clamp(min=1)
        mean = (self.chosen + self.rejected) / (2 * n)
        return {
            "loss": self.loss / n,
            "acc": self.correct / n,
            "margin": self.margin / n,
            "reward_chosen": self.chosen / n,
            "reward_rejected": self.rejected / n,
            "reward_std": (self.square / (2 * n) - mean.square()).clamp(min=0).sqrt(),
        }
