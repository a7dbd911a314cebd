"""Which parameters train: the freezing strategies of an ablation.

Each strategy takes the `RewardModel` (its `backbone` and `head`) and sets `requires_grad`; the
head always trains. A strategy that leaves a frozen trunk whose output can be cached returns it
(`FrozenTrunk`, when `cache_features`), else None. A strategy that cannot apply to a backbone
raises `FreezeError` when the model is built, before any training step. Blocks are found
generically (the longest list of identical modules: `layers` in Llama, `h` in GPT-2,
`encoder.layer` in BERT), not by hard-coded names.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import nn

from rewardlab.errors import UserError
from rewardlab.features import FrozenTrunk

if TYPE_CHECKING:
    from rewardlab.model import RewardModel


class FreezeError(UserError, ValueError):
    """A freezing strategy that cannot apply to this backbone."""


def _set(module: nn.Module, trainable: bool) -> None:
    for p in module.parameters():
        p.requires_grad_(trainable)


def transformer_blocks(backbone: nn.Module) -> tuple[str, nn.ModuleList]:
    """The backbone's stack of transformer blocks: the longest `ModuleList` of one block class."""
    stacks = [
        (name, m)
        for name, m in backbone.named_modules()
        if isinstance(m, nn.ModuleList) and len(m) > 0 and len({type(b) for b in m}) == 1
    ]
    if not stacks:
        raise FreezeError(f"{type(backbone).__name__}: found no list of transformer blocks to freeze by depth")
    return max(stacks, key=lambda s: (len(s[1]), sum(p.numel() for p in s[1].parameters())))


def modules_after_blocks(backbone: nn.Module, blocks_name: str) -> list[nn.Module]:
    """Every module of the backbone's children registered after the one holding the blocks."""
    names = [name for name, _ in backbone.named_children()]
    top = blocks_name.split(".")[0]
    after = names[names.index(top) + 1 :] if top in names else []
    return [m for n in after for m in getattr(backbone, n).modules()]


def final_norms(backbone: nn.Module, blocks_name: str) -> list[nn.Module]:
    """Normalisation layers registered after the blocks (Llama `norm`, GPT-2 `ln_f`): they shape
    the hidden state the head reads, so they train with the top blocks."""
    return [m for m in modules_after_blocks(backbone, blocks_name) if "norm" in type(m).__name__.lower()]


def full(model: RewardModel) -> None:
    """Full fine-tune: every backbone parameter and the head train."""
    _set(model, True)


def _probe(model: RewardModel) -> None:
    _set(model.backbone, False)
    _set(model.head, True)


def head_only(model: RewardModel, cache_features: bool) -> FrozenTrunk | None:
    """A linear probe: the backbone is frozen, only the head trains. With `cache_features`, each
    sequence's last-token state is computed once and reused from the second epoch on."""
    _probe(model)
    return FrozenTrunk() if cache_features else None


def last_n(model: RewardModel, n: int, cache_features: bool) -> FrozenTrunk | None:
    """The top `n` transformer blocks, the final norm and the head train; the rest is frozen. With
    `cache_features`, the input to the first trainable block is computed once and reused."""
    name, blocks = transformer_blocks(model.backbone)
    if not 1 <= n <= len(blocks):
        raise FreezeError(
            f"freeze.n={n}: the backbone has {len(blocks)} blocks ({name}); expected 1 <= n <= {len(blocks)}"
        )
    _probe(model)
    for block in blocks[len(blocks) - n :]:
        _set(block, True)
    for norm in final_norms(model.backbone, name):
        _set(norm, True)
    return FrozenTrunk(blocks=name, n_frozen=len(blocks) - n) if cache_features and n < len(blocks) else None


def bitfit(model: RewardModel) -> None:
    """BitFit: only the backbone's biases and the head train."""
    _probe(model)
    biases = [p for name, p in model.backbone.named_parameters() if name.endswith(".bias")]
    if not biases:
        raise FreezeError(
            f"freeze=bitfit: {type(model.backbone).__name__} has no bias parameters "
            "(Llama-like models are bias-free); choose another strategy"
        )
    for p in biases:
        p.requires_grad_(True)


def lora(model: RewardModel, r: int, alpha: float, dropout: float, target_modules: str | list[str]) -> None:
    """LoRA adapters (peft) on `target_modules` ("all-linear": every linear layer of the backbone);
    the base weights are frozen, the adapters and the head train, and both are saved."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=target_modules if isinstance(target_modules, str) else list(target_modules),
    )
    try:
        model.backbone = get_peft_model(model.backbone, config)
    except ValueError as e:
        raise FreezeError(f"freeze=lora: {e}") from e
    _set(model.head, True)


def eval_frozen(module: nn.Module) -> None:
    """Eval mode (no dropout) for every module whose parameters are all frozen."""
    for child in module.children():
        params = list(child.parameters())
        if params and not any(p.requires_grad for p in params):
            child.eval()
        elif params:
            eval_frozen(child)
