"""Which parameters train. Each strategy takes the `RewardModel` and sets `requires_grad`; the head
always trains."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rewardlab.model import RewardModel


def full(model: RewardModel) -> None:
    """Full fine-tune: every backbone parameter and the head train."""
    for p in model.parameters():
        p.requires_grad_(True)
