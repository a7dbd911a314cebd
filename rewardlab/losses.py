"""Losses. Pairwise ones: small classes called with the rewards of chosen and rejected (shape `(B,)`) and
each pair's `margin` (NaN where the data has none), returning the mean loss over the batch; `pairwise`
gives each pair's loss (any matching shapes, elementwise), which `head=ensemble` weighs per head. A loss
that reads margins says so with `needs_margin = True`, and the run checks every pair has one before
training. Any callable with the `__call__` signature works as a loss of your own (with `head=linear`
or `head=odin`). A loss that learns from ties (`handles_ties`) also takes each pair's `tie` flag.

A loss's `unit` says what it trains on: `pairs`; `lists`, every response of a prompt at once with its
score (`PlackettLuce`); or `points`, each response with its ratings (`Regression`, with `head=attributes`).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rewardlab.checks import ConfigError
from rewardlab.data.rows import DataError


class Loss:
    """The interface of rewardlab's pairwise losses: `pairwise` per pair, called for its mean."""

    needs_margin = False
    handles_ties = False
    unit = "pairs"

    def pairwise(self, chosen: Tensor, rejected: Tensor, margin: Tensor, tie: Tensor | None = None) -> Tensor:
        raise NotImplementedError

    def __call__(self, chosen: Tensor, rejected: Tensor, margin: Tensor, tie: Tensor | None = None) -> Tensor:
        return self.pairwise(chosen, rejected, margin, tie).mean()


def check_data(loss: object, datamodule: Any, fitting: bool) -> None:
    """Before training or testing, the data must hold what the loss reads: a margin for every pair of every
    split (`needs_margin`), and no tie pair to train on unless the loss learns from ties."""
    if getattr(loss, "needs_margin", False):
        for split, (missing, total) in datamodule.missing_margins().items():
            if missing:
                raise DataError(
                    f"the loss ({type(loss).__name__}) needs a margin for every pair, but {missing} of {total} "
                    f"{split} pairs have none (column '{datamodule.settings.columns['margin']}'); "
                    "use loss=bradley_terry"
                )
    ties = datamodule.ties_in("train") if fitting and datamodule.has("train") else 0
    if ties and not getattr(loss, "handles_ties", False):
        raise DataError(
            f"{ties} training pairs are ties ({datamodule.files['train']}, data.ties=keep), and the loss "
            f"({type(loss).__name__}) cannot learn from a tie: use loss=bt_ties, or data.ties=skip"
        )


def tie_of(loss: object, batch: dict[str, Tensor], per_head: bool = False) -> dict[str, Tensor]:
    """The `tie` argument for a loss that learns from ties, where the batch has any (`(B, 1)` per head)."""
    if not getattr(loss, "handles_ties", False) or "tie" not in batch:
        return {}
    return {"tie": batch["tie"][:, None] if per_head else batch["tie"]}


class BradleyTerry(Loss):
    """-log σ(r_w − r_l): the negative log-likelihood of the preference under Bradley–Terry."""

    def pairwise(self, chosen: Tensor, rejected: Tensor, margin: Tensor, tie: Tensor | None = None) -> Tensor:
        return -F.logsigmoid(chosen - rejected)


class MarginBradleyTerry(Loss):
    """-log σ(r_w − r_l − m): the chosen response must win by at least the pair's margin m (e.g. the
    gap between two ratings), as in Llama 2's reward models."""

    needs_margin = True

    def pairwise(self, chosen: Tensor, rejected: Tensor, margin: Tensor, tie: Tensor | None = None) -> Tensor:
        return -F.logsigmoid(chosen - rejected - margin)


class Centered(Loss):
    """Bradley–Terry + c · (r_w + r_l)² per pair: BT only sees differences, so rewards can drift; the
    penalty keeps them centred on zero (TRL's `center_rewards_coefficient`)."""

    def __init__(self, coefficient: float):
        self.coefficient = coefficient

    def pairwise(self, chosen: Tensor, rejected: Tensor, margin: Tensor, tie: Tensor | None = None) -> Tensor:
        return -F.logsigmoid(chosen - rejected) + self.coefficient * (chosen + rejected).square()


class LabelSmoothing(Loss):
    """Conservative Bradley–Terry: each label is wrong with probability ε, so the loss is
    −(1−ε) log σ(d) − ε log σ(−d) and no longer rewards pushing margins to infinity."""

    def __init__(self, epsilon: float):
        self.epsilon = epsilon

    def pairwise(self, chosen: Tensor, rejected: Tensor, margin: Tensor, tie: Tensor | None = None) -> Tensor:
        d = chosen - rejected
        return -(1 - self.epsilon) * F.logsigmoid(d) - self.epsilon * F.logsigmoid(-d)


class BradleyTerryTies(Loss, nn.Module):
    """Bradley–Terry with ties (Davidson 1970): P(w ≻ l) ∝ e^{r_w}, P(l ≻ w) ∝ e^{r_l} and P(tie) ∝
    ν·e^{(r_w + r_l)/2}, so with d = r_w − r_l the loss of a preference is −d/2 + log Z and of a tie
    −log ν + log Z, Z = e^{d/2} + e^{−d/2} + ν. ν = e^θ is learned (θ starts at `log_tie_init`); with no ties
    it still spreads probability on a tie, so it is not Bradley–Terry on decisive pairs alone. θ trains at its
    own rate `lr`: one scalar at a backbone's rate (1e-5) would barely leave its start in a run."""

    handles_ties = True

    def __init__(self, log_tie_init: float, lr: float):
        nn.Module.__init__(self)
        self.log_tie = nn.Parameter(torch.tensor(float(log_tie_init)))
        self.lr = float(lr)

    def pairwise(self, chosen: Tensor, rejected: Tensor, margin: Tensor, tie: Tensor | None = None) -> Tensor:
        d = chosen - rejected
        log_tie = self.log_tie.to(d.device, d.dtype).expand_as(d)
        log_z = torch.logsumexp(torch.stack([d / 2, -d / 2, log_tie]), 0)
        if tie is None:
            return log_z - d / 2
        return log_z - torch.where(tie.to(d.device), log_tie, d / 2)


class PlackettLuce:
    """The negative log-likelihood of each prompt's ranking under Plackett–Luce: the best response is
    drawn first with probability softmax(r), then the best of the rest, and so on. Tied responses share a
    draw (Breslow): response n's term is log Σ_{m: s_m ≤ s_n} e^{r_m} − r_n over its prompt's responses m.
    Averaged over the batch's prompts; for K = 2 without a tie it is Bradley–Terry."""

    unit = "lists"

    def __call__(self, rewards: Tensor, group: Tensor, scores: Tensor) -> Tensor:
        group, scores = group.to(rewards.device), scores.to(rewards.device)
        at_or_below = (group[:, None] == group[None, :]) & (scores[None, :] <= scores[:, None])
        log_z = torch.logsumexp(rewards[None, :].masked_fill(~at_or_below, float("-inf")), dim=1)
        return (log_z - rewards).sum() / torch.unique(group).numel()


class Regression:
    """Fits each response's ratings, one head output per attribute, on normalised targets (`head=attributes`):
    `mse`, the mean squared error; or `gaussian_nll`, ½(log σ²_a + (ŷ − y)²/σ²_a) with a learned variance per
    attribute (the head's `log_var`; the constant ½ log 2π left out), which weighs noisy attributes less."""

    unit = "points"
    KINDS = ("mse", "gaussian_nll")

    def __init__(self, kind: str):
        if kind not in self.KINDS:
            raise ConfigError(f"loss.kind: unknown {kind!r}; expected one of {', '.join(self.KINDS)}")
        self.kind = kind

    def __call__(self, predicted: Tensor, targets: Tensor, log_var: Tensor) -> Tensor:
        error = (predicted - targets.to(predicted.device)).square()
        if self.kind == "mse":
            return error.mean()
        return 0.5 * (log_var + error * torch.exp(-log_var)).mean()
