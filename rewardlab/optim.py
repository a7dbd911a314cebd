"""Optimizers torch lacks (Lion) and learning-rate schedules: warmup, then cosine, linear or constant."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR


class Lion(Optimizer):
    """Lion (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms"): the update is the
    sign of an interpolation of gradient and momentum, so every step moves each weight by exactly lr.
    Half of AdamW's optimizer memory; use a 3-10x smaller lr and a larger weight decay than AdamW.

        c = β1·m + (1−β1)·g;  w ← w·(1 − lr·wd) − lr·sign(c);  m ← β2·m + (1−β2)·g
    """

    def __init__(
        self, params: Iterable[Any], lr: float, betas: tuple[float, float] = (0.9, 0.99), weight_decay: float = 0.0
    ):
        if lr <= 0 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"Lion: lr={lr} must be > 0 and betas={betas} in [0, 1)")
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                momentum = self.state[p].setdefault("momentum", torch.zeros_like(p))
                p.mul_(1 - group["lr"] * group["weight_decay"])
                p.add_(torch.sign(momentum.mul(beta1).add_(p.grad, alpha=1 - beta1)), alpha=-group["lr"])
                momentum.mul_(beta2).add_(p.grad, alpha=1 - beta2)
        return loss


def parameter_groups(
    named: Iterator[tuple[str, nn.Parameter]], lr: float, head_lr_mult: float, loss_lr: float
) -> list[dict[str, Any]]:
    """The reward model's optimizer groups: weight decay for matrices only (not biases or norms); the head
    (`head.*`) at `head_lr_mult` × lr; a loss's own parameters (`loss_fn.*`: bt_ties' log ν) at `loss_lr`,
    without decay. Named, so the learning-rate monitor logs lr/backbone, lr/backbone_no_decay, lr/head, lr/loss."""
    decay, no_decay, head, loss = [], [], [], []
    for name, p in named:
        if not p.requires_grad:
            continue
        if name.startswith("loss_fn."):
            loss.append(p)
        else:
            (head if name.startswith("head.") else decay if p.ndim >= 2 else no_decay).append(p)
    groups = [
        {"params": decay, "name": "backbone"},
        {"params": no_decay, "weight_decay": 0.0, "name": "backbone_no_decay"},
        {"params": head, "lr": lr * head_lr_mult, "name": "head"},
        {"params": loss, "lr": loss_lr, "weight_decay": 0.0, "name": "loss"},
    ]
    return [g for g in groups if g["params"]]


def warmup_schedule(optimizer: Optimizer, total_steps: int, shape: str, warmup: float, min_lr_ratio: float) -> LambdaLR:
    """Linear warmup over `warmup` steps (a fraction of `total_steps` when below 1), then `shape`
    (cosine, linear or constant) from the peak down to `min_lr_ratio` × peak at `total_steps`."""
    if shape not in ("cosine", "linear", "constant"):
        raise ValueError(f"scheduler.shape: unknown {shape!r}; expected cosine, linear or constant")
    if warmup < 0 or not 0.0 <= min_lr_ratio <= 1.0:
        raise ValueError(f"scheduler: warmup={warmup} must be >= 0 and min_lr_ratio={min_lr_ratio} in [0, 1]")
    warmup_steps = round(warmup * total_steps) if warmup < 1 else int(warmup)

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if shape == "constant":
            return 1.0
        progress = min((step - warmup_steps) / max(total_steps - warmup_steps, 1), 1.0)
        decay = 0.5 * (1 + math.cos(math.pi * progress)) if shape == "cosine" else 1 - progress
        return min_lr_ratio + (1 - min_lr_ratio) * decay

    return LambdaLR(optimizer, factor)


def clip_gradients(optimizer: Optimizer, value: float, algorithm: str | None) -> None:
    """Clip every parameter's gradient by `value` (`algorithm` value) or their total norm (norm, the default)."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    if algorithm == "value":
        torch.nn.utils.clip_grad_value_(params, value)
    else:
        torch.nn.utils.clip_grad_norm_(params, value)
