"""Epoch metrics of a reward model's pairs."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric

STATES = ("pairs", "seen", "loss", "correct", "margin", "chosen", "rejected", "square", "tie_pairs", "tie_margin")
LENGTH_STATES = ("longer", "correct_longer", "shorter", "correct_shorter", "n", "x", "y", "xx", "yy", "xy")


class PairMetrics(Metric):
    """Loss, strict accuracy (equal rewards are wrong; tie pairs are left out and counted apart), margin,
    reward means and spread over an epoch; with the responses' lengths, accuracy where the chosen response
    is the longer and where it is the shorter, their mean (the length-controlled accuracy, both directions
    weighted equally) and the reward–length correlation; with uncertainties, their mean. Sums, so they are
    exact over any batching and reduce across devices."""

    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        for name in (*STATES, *LENGTH_STATES, "uncertain", "uncertainty"):
            self.add_state(name, default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(
        self,
        chosen: Tensor,
        rejected: Tensor,
        loss: Tensor,
        response_tokens: Tensor | None = None,
        uncertainty: Tensor | None = None,
        tie: Tensor | None = None,
    ) -> None:
        """Rewards `(B,)`; `response_tokens` `(2B,)`: chosen's then rejected's; `uncertainty` `(B,)` per pair;
        `tie` `(B,)`: tie pairs count in the loss and apart (`tie_pairs`, their mean |margin|), not in the rest."""
        chosen, rejected = chosen.double(), rejected.double()
        self.seen += chosen.numel()
        self.loss += loss.double() * chosen.numel()
        if tie is not None:
            tie = tie.to(chosen.device)
            self.tie_pairs += tie.sum()
            self.tie_margin += (chosen - rejected)[tie].abs().sum()
            chosen, rejected = chosen[~tie], rejected[~tie]
            if response_tokens is not None:
                response_tokens = response_tokens.to(tie.device).view(2, -1)[:, ~tie].flatten()
            if uncertainty is not None:
                uncertainty = uncertainty[~tie.to(uncertainty.device)]
        won = chosen > rejected
        self.pairs += chosen.numel()
        self.correct += won.sum()
        self.margin += (chosen - rejected).sum()
        self.chosen += chosen.sum()
        self.rejected += rejected.sum()
        self.square += (chosen.square() + rejected.square()).sum()
        if response_tokens is not None:
            tokens = response_tokens.to(chosen.device).double()
            gap = tokens[: len(chosen)] - tokens[len(chosen) :]
            self.longer += (gap > 0).sum()
            self.correct_longer += (won & (gap > 0)).sum()
            self.shorter += (gap < 0).sum()
            self.correct_shorter += (won & (gap < 0)).sum()
            rewards = torch.cat([chosen, rejected])
            self.n += rewards.numel()
            self.x += tokens.sum()
            self.y += rewards.sum()
            self.xx += tokens.square().sum()
            self.yy += rewards.square().sum()
            self.xy += (tokens * rewards).sum()
        if uncertainty is not None:
            self.uncertain += uncertainty.numel()
            self.uncertainty += uncertainty.double().sum()

    def compute(self) -> dict[str, Tensor]:
        n = self.pairs.clamp(min=1)
        mean = (self.chosen + self.rejected) / (2 * n)
        out = {
            "loss": self.loss / self.seen.clamp(min=1),
            "acc": self.correct / n,
            "margin": self.margin / n,
            "reward_chosen": self.chosen / n,
            "reward_rejected": self.rejected / n,
            "reward_std": (self.square / (2 * n) - mean.square()).clamp(min=0).sqrt(),
        }
        if self.longer > 0 and self.shorter > 0:
            out["acc_chosen_longer"] = self.correct_longer / self.longer
            out["acc_chosen_shorter"] = self.correct_shorter / self.shorter
            out["acc_length_controlled"] = (out["acc_chosen_longer"] + out["acc_chosen_shorter"]) / 2
        if self.n > 1:
            cov = self.xy / self.n - self.x * self.y / self.n**2
            var = (self.xx / self.n - (self.x / self.n) ** 2) * (self.yy / self.n - (self.y / self.n) ** 2)
            if var > 0:
                out["length_reward_corr"] = cov / var.sqrt()
        if self.tie_pairs > 0:
            out["tie_pairs"] = self.tie_pairs
            out["tie_abs_margin"] = self.tie_margin / self.tie_pairs
        if self.uncertain > 0:
            out["uncertainty"] = self.uncertainty / self.uncertain
        return out


class PairOutcomes:
    """Each held-out pair's rewards (and so its margin, chosen minus rejected), its responses' lengths in
    tokens and (ensembles) its uncertainty, by pair index: what the report's paired tests compare between
    runs scored on the same pairs, and what the test's length and uncertainty analyses read."""

    FIELDS = {  # name -> dtype
        "index": torch.long,
        "chosen": torch.float64,
        "rejected": torch.float64,
        "chosen_tokens": torch.long,
        "rejected_tokens": torch.long,
        "uncertainty": torch.float64,
    }

    def __init__(self) -> None:
        self.parts: dict[str, list[Tensor]] = {name: [] for name in self.FIELDS}

    def update(
        self, index: Tensor, chosen: Tensor, rejected: Tensor, response_tokens: Tensor, uncertainty: Tensor | None
    ) -> None:
        n = len(index)
        values = {
            "index": index,
            "chosen": chosen,
            "rejected": rejected,
            "chosen_tokens": response_tokens[:n],
            "rejected_tokens": response_tokens[n:],
            "uncertainty": torch.full((n,), float("nan")) if uncertainty is None else uncertainty,
        }
        for name, value in values.items():
            self.parts[name].append(value.detach().cpu().to(self.FIELDS[name]))

    def compute(self) -> dict[str, Tensor]:
        """Each field `(pairs,)` and `margin`, each pair once (a distributed sampler repeats some to even
        out ranks), gathered from every rank, sorted by index."""
        fields = {
            name: torch.cat(parts) if parts else torch.zeros(0, dtype=self.FIELDS[name])
            for name, parts in self.parts.items()
        }
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            gathered: list[Any] = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(gathered, fields)
            fields = {name: torch.cat([g[name] for g in gathered]) for name in self.FIELDS}
        order = torch.argsort(fields["index"], stable=True)
        fields = {name: value[order] for name, value in fields.items()}
        index = fields["index"]
        first = torch.ones_like(index, dtype=torch.bool)
        first[1:] = index[1:] != index[:-1]
        once = {name: value[first] for name, value in fields.items()}
        return once | {"margin": once["chosen"] - once["rejected"]}

    def reset(self) -> None:
        self.parts = {name: [] for name in self.FIELDS}
