import math

import torch

from rewardlab.losses import (
    BradleyTerry,
    BradleyTerryTies,
    Centered,
    LabelSmoothing,
    MarginBradleyTerry,
    PlackettLuce,
    Regression,
)

bradley_terry, bradley_terry_margin = BradleyTerry(), MarginBradleyTerry()
plackett_luce = PlackettLuce()

NAN3 = torch.full((3,), math.nan)


def nll(d: float) -> float:
    return math.log1p(math.exp(-d))  # -log σ(d), by hand


def test_bradley_terry_exact_values():
    chosen, rejected = torch.tensor([1.0, 0.0, 2.0]), torch.tensor([0.0, 0.0, -1.0])
    expected = (nll(1.0) + nll(0.0) + nll(3.0)) / 3
    assert math.isclose(expected, 0.3516654, rel_tol=1e-6)
    assert math.isclose(bradley_terry(chosen, rejected, NAN3).item(), expected, rel_tol=1e-6)


def test_bradley_terry_equal_rewards_is_ln2_and_ignores_margin():
    r = torch.tensor([0.3, -1.2, 5.0])
    assert math.isclose(bradley_terry(r, r, torch.tensor([1.0, 2.0, 3.0])).item(), math.log(2), rel_tol=1e-6)


def test_bradley_terry_gradient_is_sigmoid_of_minus_margin():
    chosen = torch.tensor([1.0, -2.0], requires_grad=True)
    rejected = torch.tensor([0.0, 0.0], requires_grad=True)
    bradley_terry(chosen, rejected, NAN3[:2]).backward()
    expected = [-(1 - 1 / (1 + math.exp(-d))) / 2 for d in (1.0, -2.0)]
    assert torch.allclose(chosen.grad, torch.tensor(expected), atol=1e-7)
    assert torch.allclose(rejected.grad, -chosen.grad)


def test_bradley_terry_is_stable_for_large_margins():
    loss = bradley_terry(torch.tensor([-1000.0]), torch.tensor([1000.0]), NAN3[:1])
    assert math.isclose(loss.item(), 2000.0, rel_tol=1e-6)


def test_margin_loss_shifts_the_difference_by_the_pair_margin():
    chosen, rejected, margin = torch.tensor([2.0, 1.0]), torch.tensor([0.0, 1.0]), torch.tensor([1.5, -1.0])
    expected = (nll(2.0 - 1.5) + nll(0.0 + 1.0)) / 2
    assert math.isclose(bradley_terry_margin(chosen, rejected, margin).item(), expected, rel_tol=1e-6)
    assert math.isclose(
        bradley_terry_margin(chosen, rejected, torch.zeros(2)).item(),
        bradley_terry(chosen, rejected, margin).item(),
        rel_tol=1e-6,
    )
    assert bradley_terry_margin.needs_margin and not bradley_terry.needs_margin


def test_centered_loss_adds_the_squared_sum_penalty():
    chosen, rejected = torch.tensor([3.0, -1.0]), torch.tensor([1.0, -2.0])
    bt = (nll(2.0) + nll(1.0)) / 2
    penalty = ((3.0 + 1.0) ** 2 + (-1.0 - 2.0) ** 2) / 2  # mean((r_w + r_l)^2) = (16 + 9) / 2
    loss = Centered(coefficient=0.01)(chosen, rejected, NAN3[:2])
    assert math.isclose(loss.item(), bt + 0.01 * penalty, rel_tol=1e-6)
    assert math.isclose(Centered(coefficient=0.0)(chosen, rejected, NAN3[:2]).item(), bt, rel_tol=1e-6)


def test_label_smoothing_is_conservative_bradley_terry():
    chosen, rejected = torch.tensor([2.0, 0.0]), torch.tensor([0.0, 1.0])
    eps = 0.1
    expected = sum((1 - eps) * nll(d) + eps * nll(-d) for d in (2.0, -1.0)) / 2
    loss = LabelSmoothing(epsilon=eps)(chosen, rejected, NAN3[:2])
    assert math.isclose(loss.item(), expected, rel_tol=1e-6)
    # with eps = 0 it is Bradley–Terry; with eps > 0 an infinite margin is no longer free
    assert math.isclose(
        LabelSmoothing(epsilon=0.0)(chosen, rejected, NAN3[:2]).item(),
        bradley_terry(chosen, rejected, NAN3[:2]).item(),
        rel_tol=1e-6,
    )
    far = LabelSmoothing(epsilon=eps)(torch.tensor([50.0]), torch.tensor([0.0]), NAN3[:1]).item()
    assert math.isclose(far, eps * 50.0, rel_tol=1e-3)


def test_plackett_luce_exact_value_of_a_ranking_of_three():
    # rewards 2, 1, 0 ranked in that order: [log(e²+e¹+e⁰) − 2] + [log(e¹+e⁰) − 1] + [log e⁰ − 0]
    rewards, group, scores = torch.tensor([1.0, 2.0, 0.0]), torch.tensor([0, 0, 0]), torch.tensor([2.0, 3.0, 1.0])
    expected = math.log(math.e**2 + math.e + 1) - 2 + math.log(math.e + 1) - 1
    assert math.isclose(expected, 0.7208677, rel_tol=1e-6)
    assert math.isclose(plackett_luce(rewards, group, scores).item(), expected, rel_tol=1e-6)


def test_plackett_luce_of_two_is_bradley_terry_for_every_pair_and_gradient():
    torch.manual_seed(0)
    chosen, rejected = torch.randn(5, requires_grad=True), torch.randn(5, requires_grad=True)
    rewards = torch.stack([chosen, rejected], 1).flatten()  # pair b: rows 2b (chosen) and 2b + 1
    group, scores = torch.arange(5).repeat_interleave(2), torch.tensor([1.0, 0.0]).repeat(5)
    listwise = plackett_luce(rewards, group, scores)
    pairwise = bradley_terry(chosen, rejected, torch.full((5,), math.nan))
    assert math.isclose(listwise.item(), pairwise.item(), rel_tol=1e-6)
    grads = torch.autograd.grad(listwise, (chosen, rejected))
    expected = torch.autograd.grad(pairwise, (chosen, rejected))
    assert all(torch.allclose(g, e, atol=1e-7) for g, e in zip(grads, expected))


def test_plackett_luce_ties_share_a_draw_and_the_batch_mean_is_over_prompts():
    # group 0: a tie of rewards 0.5 and −0.5: each term log(e^.5 + e^−.5) − its reward; group 1: one strict pair
    rewards = torch.tensor([0.5, -0.5, 3.0, 1.0])
    group, scores = torch.tensor([0, 0, 1, 1]), torch.tensor([4.0, 4.0, 2.0, 1.0])
    tie = 2 * math.log(math.exp(0.5) + math.exp(-0.5))  # the rewards' sum (0) drops out
    expected = (tie + nll(2.0)) / 2
    assert math.isclose(plackett_luce(rewards, group, scores).item(), expected, rel_tol=1e-6)


def test_plackett_luce_order_of_responses_in_the_batch_does_not_matter():
    rewards, group = torch.tensor([0.3, -1.0, 2.0, 0.1]), torch.tensor([0, 1, 0, 1])
    scores = torch.tensor([1.0, 5, 3, 2])
    order = torch.tensor([3, 0, 2, 1])
    a = plackett_luce(rewards, group, scores)
    assert math.isclose(a.item(), plackett_luce(rewards[order], group[order], scores[order]).item(), rel_tol=1e-6)


def test_davidson_ties_exact_values_and_the_tie_parameter_learns():
    loss = BradleyTerryTies(log_tie_init=0.0, lr=1e-2)  # ν = 1
    d = torch.tensor([1.0, 1.0])
    z = math.log(math.exp(0.5) + math.exp(-0.5) + 1)
    per_pair = loss.pairwise(d, torch.zeros(2), NAN3[:2], torch.tensor([False, True]))
    assert torch.allclose(per_pair, torch.tensor([z - 0.5, z - 0.0]), atol=1e-6)
    # the three outcomes' probabilities sum to 1 at any margin and ν
    loss.log_tie.data.fill_(0.7)
    for margin in (-3.0, 0.0, 2.5):
        r = torch.tensor([margin])
        p = [torch.exp(-loss.pairwise(r, torch.zeros(1), NAN3[:1], torch.tensor([t]))) for t in (False, True)]
        p.append(torch.exp(-loss.pairwise(torch.zeros(1), r, NAN3[:1], torch.tensor([False]))))
        assert math.isclose(sum(x.item() for x in p), 1.0, rel_tol=1e-6)
    # a batch of ties only: the loss falls as ν grows
    loss.log_tie.data.fill_(0.0)
    loss(torch.zeros(3), torch.zeros(3), NAN3, torch.ones(3, dtype=torch.bool)).backward()
    assert loss.log_tie.grad.item() < 0 and list(dict(loss.named_parameters())) == ["log_tie"]


def test_regression_exact_values_for_mse_and_gaussian_nll():
    predicted, targets = torch.tensor([[1.0, 0.0], [0.0, 2.0]]), torch.tensor([[0.0, 0.0], [0.0, 0.0]])
    log_var = torch.tensor([0.0, math.log(4.0)])
    assert math.isclose(Regression("mse")(predicted, targets, log_var).item(), (1 + 4) / 4, rel_tol=1e-6)
    # ½(log σ² + e²/σ²) per entry: attribute 0 (σ² 1): ½(0 + 1), ½(0 + 0);
    # attribute 1 (σ² 4): ½(log 4 + 0), ½(log 4 + 4/4)
    expected = (0.5 + 0 + 0.5 * math.log(4) + 0.5 * (math.log(4) + 1)) / 4
    assert math.isclose(Regression("gaussian_nll")(predicted, targets, log_var).item(), expected, rel_tol=1e-6)
