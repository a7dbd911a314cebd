"""Pairwise losses. Each takes the rewards of chosen and rejected (shape `(B,)`) and the per-pair
`margin` (NaN where the data has none) and returns the mean loss over the batch."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def bradley_terry(chosen: Tensor, rejected: Tensor, margin: Tensor) -> Tensor:
    """-log σ(r_w − r_l): the negative log-likelihood of the preference under Bradley–Terry."""
    return -F.logsigmoid(chosen - rejected).mean()
