"""Optimizers and learning-rate schedules, against hand-computed values."""

import math

import pytest
import torch

from rewardlab.optim import Lion, warmup_schedule


def test_lion_step_matches_the_update_rule():
    w = torch.nn.Parameter(torch.tensor([1.0, -2.0, 0.5]))
    opt = Lion([w], lr=0.1, betas=(0.9, 0.99), weight_decay=0.5)
    w.grad = torch.tensor([0.3, -0.2, 0.0])
    opt.step()
    # c = 0.9·0 + 0.1·g → sign(c) = [1, -1, 0]; w ← w·(1 − 0.1·0.5) − 0.1·sign(c)
    assert torch.allclose(w.detach(), torch.tensor([1.0 * 0.95 - 0.1, -2.0 * 0.95 + 0.1, 0.5 * 0.95]))
    assert torch.allclose(opt.state[w]["momentum"], 0.01 * torch.tensor([0.3, -0.2, 0.0]))
    w.grad = torch.tensor([-0.01, -0.01, 0.01])
    before = w.detach().clone()
    opt.step()
    # c = 0.9·m + 0.1·g = [0.0027 − 0.001, −0.0018 − 0.001, 0.001] → sign = [1, −1, 1]
    assert torch.allclose(w.detach(), before * 0.95 - 0.1 * torch.tensor([1.0, -1.0, 1.0]))


def lrs(shape: str, warmup: float, total: int = 10, min_lr_ratio: float = 0.0) -> list[float]:
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = warmup_schedule(opt, total, shape, warmup, min_lr_ratio)
    out = []
    for _ in range(total):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_warmup_as_a_ratio_or_a_number_of_steps():
    assert lrs("constant", 0.2, min_lr_ratio=1.0)[:3] == [0.5, 1.0, 1.0]  # 0.2 × 10 = 2 warmup steps
    assert lrs("constant", 4, min_lr_ratio=1.0)[:5] == [0.25, 0.5, 0.75, 1.0, 1.0]


def test_cosine_and_linear_decay_to_the_floor():
    cosine = lrs("cosine", 0, total=10)
    assert cosine[0] == 1.0 and cosine[5] == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))
    linear = lrs("linear", 0, total=10, min_lr_ratio=0.1)
    assert linear[5] == pytest.approx(0.1 + 0.9 * 0.5)
    assert all(a >= b for a, b in zip(linear, linear[1:]))


def test_bad_schedule_settings_name_the_key():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    with pytest.raises(ValueError, match="scheduler.shape"):
        warmup_schedule(opt, 10, "step", 0.1, 0.0)
