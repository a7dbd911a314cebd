import math

import torch

from rewardlab.losses import bradley_terry

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
