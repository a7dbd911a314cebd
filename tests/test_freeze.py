"""Freezing strategies: exact trainable counts, and after training frozen weights are bit-identical
while every trainable tensor moved."""

from __future__ import annotations

from functools import partial

import lightning as L
import pytest
import torch
from hydra.utils import instantiate

from rewardlab import freeze
from rewardlab.backbones import tiny
from rewardlab.freeze import FreezeError
from rewardlab.model import RewardModel
from rewardlab.train import train

from .conftest import reward_model

FAMILIES = ["llama", "gpt2", "bert"]
STRATEGIES = ["full", "last_n", "head_only", "bitfit", "lora"]


def model_with(family: str, strategy) -> RewardModel:
    torch.manual_seed(0)
    bb = tiny(family, 32, 3, 4, 64, 128, 0.0)
    return reward_model(bb.model, strategy)


def trainable(model: RewardModel) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def numel(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize(
    "family, blocks, norm",
    [("llama", "layers", "norm"), ("gpt2", "h", "ln_f"), ("bert", "encoder.layer", None)],
)
def test_blocks_and_final_norm_are_found_generically(family, blocks, norm):
    model = model_with(family, freeze.full)
    name, stack = freeze.transformer_blocks(model.backbone)
    assert name == blocks and len(stack) == 3
    norms = freeze.final_norms(model.backbone, name)
    assert norms == ([] if norm is None else [model.backbone.get_submodule(norm)])


@pytest.mark.parametrize("family", FAMILIES)
def test_trainable_counts_are_what_each_strategy_promises(family):
    hidden = 32
    full = model_with(family, freeze.full)
    assert trainable(full) == numel(full)  # the BERT pooler is dropped: unused by a last-token reward

    head_only = model_with(family, partial(freeze.head_only, cache_features=False))
    assert trainable(head_only) == hidden

    two = model_with(family, partial(freeze.last_n, n=2, cache_features=False))
    name, blocks = freeze.transformer_blocks(two.backbone)
    norms = sum(numel(m) for m in freeze.final_norms(two.backbone, name))
    assert trainable(two) == numel(blocks[1]) + numel(blocks[2]) + norms + hidden

    lora = model_with(family, partial(freeze.lora, r=4, alpha=8, dropout=0.0, target_modules="all-linear"))
    adapters = sum(p.numel() for n, p in lora.named_parameters() if "lora_" in n)
    assert adapters > 0 and trainable(lora) == adapters + hidden
    assert trainable(full) > trainable(two) > trainable(head_only) and trainable(lora) < trainable(full)

    if family == "llama":
        with pytest.raises(FreezeError, match="no bias parameters"):
            model_with(family, freeze.bitfit)
    else:
        bitfit = model_with(family, freeze.bitfit)
        biases = sum(p.numel() for n, p in bitfit.backbone.named_parameters() if n.endswith(".bias"))
        assert trainable(bitfit) == biases + hidden


@pytest.mark.parametrize("n", [0, 4])
def test_last_n_beyond_the_depth_fails_before_training(n):
    with pytest.raises(FreezeError, match=rf"freeze.n={n}: the backbone has 3 blocks \(layers\)"):
        model_with("llama", partial(freeze.last_n, n=n, cache_features=False))


CASES = [(f, s) for f in FAMILIES for s in STRATEGIES if (f, s) != ("llama", "bitfit")]


@pytest.mark.parametrize("family, strategy", CASES, ids=[f"{f}-{s}" for f, s in CASES])
def test_after_training_frozen_weights_are_identical_and_trainable_ones_moved(family, strategy, make_cfg):
    cfg = make_cfg(f"freeze={strategy}", f"backbone.family={family}", "trainer.limit_train_batches=6")
    L.seed_everything(cfg.seed, workers=True)  # train() builds the same initial weights after this seed
    initial = instantiate(
        cfg.model,
        backbone=instantiate(cfg.backbone).model,
        loss=instantiate(cfg.loss),
        optimizer=instantiate(cfg.optimizer),
        scheduler=None,
        freeze=instantiate(cfg.freeze),
        head=instantiate(cfg.head),
    )
    before = {n: p.detach().clone() for n, p in initial.named_parameters()}
    results = train(cfg)
    final = torch.load(f"{cfg.paths.output_dir}/checkpoints/last.ckpt", weights_only=True)["state_dict"]
    assert results["params/trainable"] == trainable(initial)
    frozen = [n for n, p in initial.named_parameters() if not p.requires_grad]
    moved = [n for n, p in initial.named_parameters() if p.requires_grad and n != invisible_bias(initial)]
    assert moved and (frozen or strategy == "full")
    for name in frozen:
        assert torch.equal(final[name], before[name]), f"frozen {name} changed"
    for name in moved:
        assert not torch.equal(final[name], before[name]), f"trainable {name} did not change"


def invisible_bias(model: RewardModel) -> str | None:
    """The bias of the norm right under the head adds the same w·β to chosen and rejected, so a
    pairwise loss gives it exactly zero gradient (like a head bias): trainable, but it cannot move."""
    norms = [n for n, m in model.named_modules() if "norm" in type(m).__name__.lower()]
    bias = f"{norms[-1]}.bias" if norms else None
    return bias if bias in dict(model.named_parameters()) else None


def test_frozen_modules_run_without_dropout_and_trained_ones_with_it():
    torch.manual_seed(0)
    model = reward_model(tiny("bert", 32, 3, 4, 64, 128, 0.1).model, partial(freeze.last_n, n=1, cache_features=False))
    layers = model.backbone.encoder.layer
    assert model.training and model.head.training and layers[2].training and layers[2].output.dropout.training
    assert not model.backbone.embeddings.training and not layers[0].training and not layers[1].attention.training
    model.eval()
    model.train()  # Lightning's validation loop switches back and forth
    assert layers[2].training and not layers[0].training
    probe = reward_model(tiny("bert", 32, 3, 4, 64, 128, 0.1).model, partial(freeze.head_only, cache_features=False))
    assert not probe.backbone.training and not any(m.training for m in probe.backbone.modules())
    full = reward_model(tiny("bert", 32, 3, 4, 64, 128, 0.1).model)
    assert all(m.training for m in full.modules())


def test_disable_dropout_turns_every_dropout_off():
    quiet = reward_model(tiny("bert", 32, 3, 4, 64, 128, 0.1).model, disable_dropout=True)
    assert all(m.p == 0.0 for m in quiet.modules() if isinstance(m, torch.nn.Dropout))
    model = tiny("llama", 32, 2, 4, 64, 128, 0.1).model
    reward_model(model, disable_dropout=True)
    assert all(layer.self_attn.attention_dropout == 0.0 for layer in model.layers)
