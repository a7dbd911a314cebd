"""Learning-rate schedules: warmup, then cosine, linear or constant."""

from __future__ import annotations

import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR


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
