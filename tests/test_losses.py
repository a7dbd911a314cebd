import math

import torch

from rewardlab.losses import BradleyTerry, Centered, LabelSmoothing, MarginBradleyTerry

bradley_terry, bradley_terry_margin = BradleyTerry(), MarginBradleyTerry()

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
