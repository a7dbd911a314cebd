"""Epoch metrics of a reward model's pairs."""

from __future__ import annotations

from typing import Any

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


class PairOutcomes:
    """Each held-out pair's reward margin (chosen minus rejected), by pair index: what the report's
    paired tests compare between runs scored on the same pairs."""

    def __init__(self) -> None:
        self.index: list[Tensor] = []
        self.margin: list[Tensor] = []

    def update(self, index: Tensor, chosen: Tensor, rejected: Tensor) -> None:
        self.index.append(index.detach().cpu().long())
        self.margin.append((chosen - rejected).detach().cpu().double())

    def compute(self) -> tuple[Tensor, Tensor]:
        """(index, margin), each pair once (a distributed sampler repeats some to even out ranks),
        gathered from every rank, sorted by index."""
        index = torch.cat(self.index) if self.index else torch.zeros(0, dtype=torch.long)
        margin = torch.cat(self.margin) if self.margin else torch.zeros(0, dtype=torch.float64)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            parts: list[Any] = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(parts, (index, margin))
            index, margin = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
        order = torch.argsort(index, stable=True)
        index, margin = index[order], margin[order]
        first = torch.ones_like(index, dtype=torch.bool)
        first[1:] = index[1:] != index[:-1]
        return index[first], margin[first]

    def reset(self) -> None:
        self.index, self.margin = [], []
