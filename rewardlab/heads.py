"""Reward heads (`conf/head/`): a linear map from the pooled hidden state to a few outputs, and what the
reward, its uncertainty and the training objective are made of those outputs.

- `LinearHead`: one output, the reward (the default).
- `EnsembleHead`: k outputs, each trained on its own bootstrap resample of the training pairs (fixed
  Poisson(1) weights per pair and head, so one forward pass serves every head); the reward is their
  mean, its uncertainty their standard deviation (Coste et al. 2023; WARM, Ramé et al. 2024).
- `AttributesHead`: one output per rated attribute, fitted by `loss=regression` on normalised ratings; the
  reward is their configured combination (HelpSteer2-style regression, ArmoRM's attribute heads).
- `OdinHead`: a quality and a length output trained as in ODIN (Chen et al. 2024): their sum fits the
  preferences, the length output is pushed to correlate with response length, the quality output to
  not correlate with it, and the two weight vectors towards orthogonal; the reward is the quality
  output alone.

The training loss a head optimises is its `objective`; the loss logged as `train/loss`, `val/loss` and
`test/loss` is always the pairwise loss of the reward itself, so it compares across heads.

Every head is one `(outputs, hidden)` weight matrix without bias, so the reward is one linear function of
the pooled state (`reward_weight`): the exported single-logit model gives it exactly.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from rewardlab.checks import ConfigError
from rewardlab.losses import Loss, tie_of


def pearson(x: Tensor, y: Tensor) -> Tensor:
    """Pearson correlation of two 1-d tensors, differentiable; 0, with zero gradient, when either is
    constant (a batch whose responses all have one length has no direction to correlate with). No
    host sync: the choice is a `torch.where`."""
    x, y = x - x.mean(), y - y.mean()
    variance = x.square().sum() * y.square().sum()
    varies = variance > 0
    r = (x * y).sum() / torch.where(varies, variance, torch.ones_like(variance)).sqrt()
    return torch.where(varies, r, torch.zeros_like(r))


class Head(nn.Module):
    """`outputs` linear outputs of the pooled hidden state, computed in float32."""

    kind = ""  # its option in conf/head/
    uncertain = False  # whether `uncertainty` gives a value (the export then carries every output's weights)
    carried = False  # whether an export carries every output's weights (for the spread, or the attributes)

    def __init__(self, hidden: int, outputs: int, init_std: float | None):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(outputs, hidden))
        nn.init.normal_(self.weight, std=1 / math.sqrt(hidden + 1) if init_std is None else init_std)

    def forward(self, pooled: Tensor) -> Tensor:
        """`(N, outputs)`, float32 even under mixed precision (it runs outside autocast)."""
        with torch.autocast(device_type=pooled.device.type, enabled=False):
            return pooled.float() @ self.weight.float().T

    def reward(self, outputs: Tensor) -> Tensor:
        """The reward `(N,)` of each sequence from its outputs."""
        return outputs[:, 0]

    def reward_weight(self) -> Tensor:
        """The `(1, hidden)` weight with `reward(forward(h)) == (h @ reward_weight().T)[:, 0]`."""
        return self.weight[:1]

    def uncertainty(self, outputs: Tensor) -> Tensor | None:
        """How much the outputs disagree, `(N,)`, for a head with several estimates of one quantity: of a
        response's reward (outputs of a response), or of a pair's margin (chosen's outputs minus
        rejected's); None for a head that cannot tell."""
        return None

    def check(self, loss: Any) -> None:
        """Before training: refuse a loss this head cannot train with (a `ConfigError` naming it)."""
        if getattr(loss, "unit", "pairs") == "points":
            raise ConfigError(
                f"loss=regression fits one output per attribute: use head=attributes, not head={self.kind}"
            )

    def objective(
        self, loss: Loss, chosen: Tensor, rejected: Tensor, batch: dict[str, Tensor]
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """The training loss from the outputs `(B, outputs)` of chosen and rejected, and its parts to log."""
        return loss(self.reward(chosen), self.reward(rejected), batch["margin"], **tie_of(loss, batch)), {}

    def prepare(self, train_pairs: int) -> None:
        """Called before fitting with the number of pairs in the training split (their `index` range)."""


class LinearHead(Head):
    """r = w·h: one linear output (`head=linear`)."""

    kind = "linear"

    def __init__(self, hidden: int, init_std: float | None):
        super().__init__(hidden, 1, init_std)


class EnsembleHead(Head):
    """k linear heads on one backbone output (`head=ensemble`): reward = their mean, uncertainty = their
    population standard deviation (ddof 0). With `bootstrap`, head j sees pair i with weight
    w_ij ~ Poisson(1), drawn once per run from `seed` (the online bootstrap: as if each head trained on
    its own resample of the pairs, with replacement); otherwise heads differ only by their initialisation.
    The objective is the mean over heads of Σ_i w_ij ℓ_ij / B, so with all weights 1 it is the loss of
    each head averaged. (The mean of k heads initialised independently starts 1/√k as large as one.)"""

    kind = "ensemble"
    uncertain = carried = True

    def __init__(self, hidden: int, init_std: float | None, k: int, bootstrap: bool, seed: int):
        if k < 2:
            raise ConfigError(f"head.k: an ensemble needs at least 2 heads, got {k}")
        super().__init__(hidden, k, init_std)
        self.bootstrap, self.seed = bootstrap, seed
        self.weights: Tensor | None = (
            None  # (train pairs, k) uint8 counts, from `prepare`; moved to the outputs' device
        )

    def reward(self, outputs: Tensor) -> Tensor:
        return outputs.mean(-1)

    def reward_weight(self) -> Tensor:
        return self.weight.mean(0, keepdim=True)

    def uncertainty(self, outputs: Tensor) -> Tensor:
        return outputs.std(-1, correction=0)

    def check(self, loss: Any) -> None:
        super().check(loss)
        if not isinstance(loss, Loss) or type(loss).pairwise is Loss.pairwise:
            raise ConfigError(
                f"head=ensemble weighs each pair per head, so the loss must be a rewardlab.losses.Loss with a "
                f"per-pair `pairwise`; got {type(loss).__name__}"
            )

    def prepare(self, train_pairs: int) -> None:
        if self.bootstrap:
            generator = torch.Generator().manual_seed(self.seed)
            draws = torch.poisson(torch.ones(train_pairs, self.weight.shape[0]), generator=generator)
            self.weights = draws.clamp(max=255).to(torch.uint8)  # P(a Poisson(1) draw > 255) is 0 in float64

    def objective(
        self, loss: Loss, chosen: Tensor, rejected: Tensor, batch: dict[str, Tensor]
    ) -> tuple[Tensor, dict[str, Tensor]]:
        terms = loss.pairwise(chosen, rejected, batch["margin"][:, None], **tie_of(loss, batch, True))  # (B, k)
        if self.bootstrap:
            if self.weights is None:
                raise RuntimeError("head=ensemble with bootstrap: `prepare` was not called before training")
            if self.weights.device != terms.device:
                self.weights = self.weights.to(terms.device)
            terms = terms * self.weights[batch["index"].to(terms.device)]
        return terms.mean(), {}


class OdinHead(Head):
    """ODIN's two heads (`head=odin`): output 0 is quality (the reward), output 1 length. The objective
    is loss(q + l) + length_coef · (|ρ(q, n)| − ρ(l, n)) + ortho_coef · |cos(w_q, w_l)|, where ρ is
    Pearson's correlation over the batch's responses and n their response tokens (after the prompt).
    The orthogonality term is on unit-normalised weights (a cosine), as ODIN's code normalises them;
    the paper writes |w_q · w_l|. Its parts are logged per step (on several devices, rank 0's)."""

    kind = "odin"

    def __init__(self, hidden: int, init_std: float | None, length_coef: float, ortho_coef: float):
        super().__init__(hidden, 2, init_std)
        self.length_coef, self.ortho_coef = length_coef, ortho_coef

    def check(self, loss: Any) -> None:
        super().check(loss)
        if getattr(loss, "unit", "pairs") != "pairs":
            raise ConfigError("head=odin decorrelates the rewards of a batch's pairs: it needs a pairwise loss")

    def objective(
        self, loss: Loss, chosen: Tensor, rejected: Tensor, batch: dict[str, Tensor]
    ) -> tuple[Tensor, dict[str, Tensor]]:
        fit = loss(chosen.sum(-1), rejected.sum(-1), batch["margin"], **tie_of(loss, batch))
        outputs = torch.cat([chosen, rejected])
        tokens = batch["response_tokens"].to(outputs.device, torch.float32)
        quality, length = pearson(outputs[:, 0], tokens), pearson(outputs[:, 1], tokens)
        ortho = nn.functional.cosine_similarity(self.weight[0], self.weight[1], dim=0).abs()
        total = fit + self.length_coef * (quality.abs() - length) + self.ortho_coef * ortho
        return total, {"fit_loss": fit, "quality_length_corr": quality, "length_length_corr": length, "ortho": ortho}


class AttributesHead(Head):
    """One output per attribute (`head=attributes`), each predicting that attribute's normalised rating
    z_a = (y_a − μ_a)/σ_a (μ, σ from the training ratings with `normalize`, else 0 and 1). The reward is the
    combination Σ_a w_a·σ_a·z_a = Σ_a w_a·(ŷ_a − μ_a): the weighted predicted ratings, centred, so it ranks as
    the combined score the data's pairs are made of, and stays one linear function of the pooled state.
    `log_var` is each attribute's learned log-variance, read by `loss.kind=gaussian_nll` only."""

    kind = "attributes"
    carried = True

    def __init__(self, hidden: int, init_std: float | None, names: list[str], weights: list[float], normalize: bool):
        names, weights = list(names), [float(w) for w in weights]
        if not names or len(names) != len(weights) or len(set(names)) != len(names):
            raise ConfigError(
                f"head.names {names} and head.weights {weights} (from data.attributes and data.attribute_weights): "
                "expected as many distinct names as weights"
            )
        super().__init__(hidden, len(names), init_std)
        self.names, self.normalize = names, normalize
        self.register_buffer("combination", torch.tensor(weights, dtype=torch.float32))
        self.register_buffer("mean", torch.zeros(len(names)))
        self.register_buffer("std", torch.ones(len(names)))
        self.log_var = nn.Parameter(torch.zeros(len(names)))

    def check(self, loss: Any) -> None:
        if getattr(loss, "unit", "pairs") != "points":
            raise ConfigError("head=attributes is fitted to ratings: use loss=regression (with ratings data)")

    def fit_targets(self, targets: Tensor) -> None:
        """Set μ and σ from the training ratings `(responses, attributes)` (with `normalize`); an attribute
        that never varies keeps σ = 1."""
        if self.normalize and len(targets):
            std = targets.double().std(0, correction=0)
            self.mean.copy_(targets.double().mean(0))
            self.std.copy_(torch.where(std > 0, std, torch.ones_like(std)))

    def normalised(self, targets: Tensor) -> Tensor:
        return (targets.to(self.mean.device) - self.mean) / self.std

    def description(self) -> dict[str, Any]:
        """What an export records to rebuild this head: attribute names, combination weights, μ and σ."""
        return {"names": self.names, "combination": self.combination.tolist(), "mean": self.mean.tolist(),
                "std": self.std.tolist()}  # fmt: skip

    def attributes(self, outputs: Tensor) -> Tensor:
        """Predicted ratings in the data's units, `(N, attributes)`."""
        return outputs * self.std + self.mean

    def scale(self) -> Tensor:
        return self.combination * self.std

    def reward(self, outputs: Tensor) -> Tensor:
        return outputs @ self.scale()

    def reward_weight(self) -> Tensor:
        return (self.scale() @ self.weight)[None]
