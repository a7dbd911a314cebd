"""Reward heads (`rewardlab.heads`, conf/head/): exact objectives on hand-computed cases, what the reward
and uncertainty are made of, and that every head trains with every freezing strategy and loss."""

from __future__ import annotations

import math
import re
from functools import partial
from pathlib import Path

import pytest
import torch

from rewardlab.backbones import tiny
from rewardlab.checks import ConfigError
from rewardlab.heads import EnsembleHead, LinearHead, OdinHead, pearson
from rewardlab.losses import BradleyTerry, Loss
from rewardlab.train import train

from .conftest import reward_model
from .test_configs import margin_data  # noqa: F401 - a fixture

softplus = lambda d: math.log1p(math.exp(-d))  # noqa: E731 - Bradley–Terry's loss of a margin d


def test_pearson_by_hand_and_zero_without_nan_for_a_constant():
    # x = [1, 2, 3], y = [1, 3, 2]: centred (-1, 0, 1) and (-1, 1, 0): cov 1, norms √2 √2 -> 0.5
    assert pearson(torch.tensor([1.0, 2, 3]), torch.tensor([1.0, 3, 2])).item() == pytest.approx(0.5)
    x = torch.tensor([1.0, 2, 3], requires_grad=True)
    r = pearson(x, torch.tensor([4.0, 4, 4]))  # a batch whose responses all have one length
    r.backward()
    assert r.item() == 0 and torch.equal(x.grad, torch.zeros(3))


def test_linear_head_reward_is_its_single_output_and_its_objective_the_loss():
    head = LinearHead(2, None)
    head.weight.data = torch.tensor([[2.0, -1.0]])
    out = head(torch.tensor([[1.0, 1.0], [0.0, 3.0]]))
    assert out.tolist() == [[1.0], [-3.0]] and head.reward(out).tolist() == [1.0, -3.0]
    assert head.uncertainty(out) is None
    loss, parts = head.objective(BradleyTerry(), out[:1], out[1:], {"margin": torch.zeros(1)})
    assert loss.item() == pytest.approx(softplus(4.0)) and parts == {}


def test_ensemble_reward_is_the_mean_its_uncertainty_the_spread_and_one_linear_head():
    head = EnsembleHead(2, None, k=2, bootstrap=False, seed=0)
    head.weight.data = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    out = head(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))  # outputs [[1, 0], [0, 2]]
    assert head.reward(out).tolist() == [0.5, 1.0]
    assert head.uncertainty(out).tolist() == [0.5, 1.0]  # population std over the 2 heads
    h = torch.randn(5, 2)
    assert torch.allclose(h @ head.reward_weight().T, head.reward(head(h))[:, None])


def test_ensemble_objective_weighs_each_pair_per_head_by_hand():
    head = EnsembleHead(2, None, k=2, bootstrap=True, seed=0)
    head.weights = torch.tensor([[2.0, 0.0], [1.0, 1.0]])  # pair 0: twice in head 0's resample, absent from head 1's
    chosen = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    rejected = torch.tensor([[0.0, 0.0], [1.0, 0.0]])  # margins [[1, 0], [-1, 2]]
    batch = {"margin": torch.zeros(2), "index": torch.tensor([0, 1])}
    loss, _ = head.objective(BradleyTerry(), chosen, rejected, batch)
    expected = (2 * softplus(1) + 0 * softplus(0) + softplus(-1) + softplus(2)) / 4  # Σ w ℓ / (B k)
    assert loss.item() == pytest.approx(expected)
    plain = EnsembleHead(2, None, k=2, bootstrap=False, seed=0)  # every weight 1: the heads' losses averaged
    loss, _ = plain.objective(BradleyTerry(), chosen, rejected, batch)
    assert loss.item() == pytest.approx((softplus(1) + softplus(0) + softplus(-1) + softplus(2)) / 4)
    unprepared = EnsembleHead(2, None, k=2, bootstrap=True, seed=0)
    with pytest.raises(RuntimeError, match="prepare"):  # never silently unweighted
        unprepared.objective(BradleyTerry(), chosen, rejected, batch)


def test_bootstrap_weights_are_poisson_one_fixed_by_the_seed():
    a, b = EnsembleHead(4, None, 4, True, seed=7), EnsembleHead(4, None, 4, True, seed=7)
    a.prepare(5000)
    b.prepare(5000)
    assert torch.equal(a.weights, b.weights) and a.weights.shape == (5000, 4) and a.weights.dtype == torch.uint8
    assert abs(a.weights.float().mean().item() - 1) < 0.03  # Poisson(1): mean 1, P(0) = 1/e
    assert abs((a.weights == 0).float().mean().item() - math.exp(-1)) < 0.02
    c = EnsembleHead(4, None, 4, True, seed=8)
    c.prepare(5000)
    assert not torch.equal(a.weights, c.weights)
    assert not torch.equal(a.weights[:, 0], a.weights[:, 1])  # each head its own resample


class MeanOnly(Loss):
    """A loss of one's own written before `pairwise` existed: only the batch mean."""

    def __call__(self, chosen, rejected, margin):
        return (rejected - chosen).mean()


def test_an_ensemble_refuses_a_loss_it_cannot_weigh_per_pair_and_fewer_than_two_heads():
    head = EnsembleHead(2, None, 2, False, 0)
    for loss in (lambda c, r, m: (c - r).mean(), MeanOnly()):
        with pytest.raises(ConfigError, match="per-pair `pairwise`"):
            head.check(loss)
    LinearHead(2, None).check(MeanOnly())  # the others take any callable
    with pytest.raises(ConfigError, match="head.k"):
        EnsembleHead(2, None, 1, False, 0)
    with pytest.raises(ConfigError, match="per-pair"):  # refused when the model is built, before any step
        ensemble = partial(EnsembleHead, k=2, bootstrap=False, seed=0)
        reward_model(tiny("llama", 32, 1, 2, 64, 128, 0.0).model, head=ensemble, loss=MeanOnly())


def test_odin_objective_by_hand():
    head = OdinHead(2, None, length_coef=0.5, ortho_coef=2.0)
    head.weight.data = torch.tensor([[1.0, 0.0], [1.0, 1.0]])  # cos(w_q, w_l) = 1/√2
    chosen = torch.tensor([[1.0, 2.0], [0.0, 1.0]])  # columns: quality, length
    rejected = torch.tensor([[0.0, 0.0], [1.0, 3.0]])
    batch = {"margin": torch.zeros(2), "response_tokens": torch.tensor([10, 4, 2, 12])}  # chosen's, then rejected's
    loss, parts = head.objective(BradleyTerry(), chosen, rejected, batch)
    # sums q + l: chosen [3, 1], rejected [0, 4] -> margins [3, -3]
    fit = (softplus(3) + softplus(-3)) / 2
    # q = [1, 0, 0, 1], l = [2, 1, 0, 3], n = [10, 4, 2, 12]: centred n (3, -3, -5, 5), |n|² 68
    rho_q, rho_l = 8 / math.sqrt(68), 18 / math.sqrt(5 * 68)
    assert parts["fit_loss"].item() == pytest.approx(fit)
    assert parts["quality_length_corr"].item() == pytest.approx(rho_q)
    assert parts["length_length_corr"].item() == pytest.approx(rho_l)
    assert parts["ortho"].item() == pytest.approx(1 / math.sqrt(2))
    assert loss.item() == pytest.approx(fit + 0.5 * (abs(rho_q) - rho_l) + 2 / math.sqrt(2))
    assert loss.item() == pytest.approx(2.9597786339275265)
    assert head.reward(chosen).tolist() == [1.0, 0.0]  # the quality output alone
    assert torch.equal(head.reward_weight(), torch.tensor([[1.0, 0.0]]))


HEADS = ["linear", "ensemble", "odin"]
STRATEGIES = ["full", "last_n", "head_only", "lora", "bitfit"]
LOSSES = ["bradley_terry", "margin", "centered", "label_smoothing"]
# every (head, freeze) pair once, the losses taking turns so that every (head, loss) pair occurs too
COMBOS = [(h, f, LOSSES[(i + j) % len(LOSSES)]) for i, h in enumerate(HEADS) for j, f in enumerate(STRATEGIES)]


@pytest.mark.parametrize("head, strategy, loss", COMBOS, ids=[f"{h}-{f}-{lo}" for h, f, lo in COMBOS])
def test_every_head_trains_with_every_freezing_strategy_and_loss(head, strategy, loss, make_cfg, margin_data):  # noqa: F811
    data = [
        f"data.train_file={margin_data}/train.jsonl",
        f"data.val_file={margin_data}/val.jsonl",
        "data.test_file=null",
    ]
    family = ["backbone.family=gpt2"] if strategy == "bitfit" else []  # Llama-like backbones have no biases
    cfg = make_cfg(
        f"head={head}", f"freeze={strategy}", f"loss={loss}", *data, *family, "trainer.limit_train_batches=4"
    )
    results = train(cfg)
    assert results["global_step"] >= 1 and math.isfinite(results["val/loss"])
    state = torch.load(Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert state["head.weight"].shape[0] == {"linear": 1, "ensemble": 4, "odin": 2}[head]
    assert ("val/uncertainty" in results) == (head == "ensemble")
    assert ("train/objective" in results) == (head != "linear")  # a head's own objective is logged apart
    assert ("train/fit_loss" in results and "train/ortho" in results) == (head == "odin")
    assert math.isfinite(results["train/loss"])  # always the loss of the reward


def test_resuming_with_another_head_is_refused(make_cfg):
    cfg = make_cfg("trainer.max_steps=4", "trainer.val_check_interval=2")
    train(cfg)
    ckpt = Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"
    for change in ("head=odin", "head=ensemble"):
        resumed = make_cfg(f"ckpt_path={ckpt}", "trainer.max_steps=8", change, "resume.allow_changes=true",
                           folder=f"again-{change}")  # fmt: skip
        with pytest.raises(ConfigError, match="cannot take these: head._target_"):
            train(resumed)


@pytest.mark.parametrize(
    "override, says",
    [("head=ensemble head.k=1", "head.k: expected an integer in [2, 1024]"),
     ("head=odin head.length_coef=-1", "head.length_coef: expected a finite number >= 0"),
     ("uncertainty_quantiles=0", "uncertainty_quantiles: expected an integer in [1, 1000]")],
)  # fmt: skip
def test_head_settings_out_of_range_are_refused_naming_the_key(override, says, make_cfg):
    with pytest.raises(ConfigError, match=re.escape(says)):
        train(make_cfg(*override.split()))


def confounded_features(n: int, longer_share: float, generator: torch.Generator) -> tuple:
    """Synthetic pooled states [weak quality signal, length / 10, noise, noise] of chosen and rejected, and
    their response tokens; the chosen response is the longer in `longer_share` of the pairs."""
    a = torch.randint(5, 30, (n,), generator=generator).float()
    b = torch.randint(5, 30, (n,), generator=generator).float()
    longer = torch.rand(n, generator=generator) < longer_share
    long, short = torch.maximum(a, b) + 1, torch.minimum(a, b)
    tokens_c, tokens_r = torch.where(longer, long, short), torch.where(longer, short, long)

    def states(quality: float, tokens: torch.Tensor) -> torch.Tensor:
        noise = torch.randn(n, 3, generator=generator)
        return torch.stack([quality + noise[:, 0], tokens / 10, noise[:, 1], noise[:, 2]], 1)

    return states(0.3, tokens_c), states(-0.3, tokens_r), tokens_c, tokens_r


def test_odin_keeps_length_out_of_the_reward_where_a_linear_head_learns_it():
    """Trained on states where the chosen response is the longer in 90% of pairs and quality is a weak
    signal, a linear head leans on length; ODIN's quality head carries almost none of it and ranks
    length-balanced pairs better."""
    generator = torch.Generator().manual_seed(0)
    train_c, train_r, tokens_c, tokens_r = confounded_features(4000, 0.9, generator)
    test_c, test_r, _, _ = confounded_features(4000, 0.5, generator)
    accuracy = {}
    for name, head in (("linear", LinearHead(4, None)), ("odin", OdinHead(4, None, 1.0, 1.0))):
        torch.manual_seed(0)
        head.weight.data.normal_(std=0.2)
        optimizer = torch.optim.Adam(head.parameters(), lr=1e-2)
        for _ in range(1500):
            i = torch.randint(0, 4000, (16,), generator=generator)
            batch = {"margin": torch.zeros(16), "response_tokens": torch.cat([tokens_c[i], tokens_r[i]]), "index": i}
            loss, _ = head.objective(BradleyTerry(), head(train_c[i]), head(train_r[i]), batch)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        accuracy[name] = (head.reward(head(test_c)) > head.reward(head(test_r))).float().mean().item()
        length_weight = head.reward_weight()[0, 1].abs().item()
        assert length_weight > 1.0 if name == "linear" else length_weight < 0.1
    assert accuracy["odin"] > accuracy["linear"] + 0.03
