"""Each packaged backbone learns the quiz in a few dozen steps with its own recipe (conf/backbone/),
nothing else set: swapping the backbone never keeps another model's learning rate."""

from __future__ import annotations

import pytest

from rewardlab.train import train


@pytest.mark.slow
@pytest.mark.parametrize(
    ("backbone", "steps"),
    [("tiny", 400), ("minilm", 48), ("smollm2_135m", 48)],  # the tiny model starts from random weights
)
def test_each_packaged_backbone_learns_with_its_recipe(backbone, steps, make_cfg):
    cfg = make_cfg(
        f"backbone={backbone}",
        f"trainer.max_steps={steps}",
        "trainer.limit_train_batches=1.0",
        "trainer.limit_val_batches=1.0",
        "trainer.precision=32-true",
        "test=false",
        *(["backbone.attn_implementation=sdpa"] if backbone != "tiny" else []),
        "callbacks.model_checkpoint.save_weights_only=true",  # the best only: SmolLM2 0.5 GB, not 3 x 1.6
        "callbacks.model_checkpoint.save_last=false",
        "~callbacks.last_checkpoint",
        *(
            ["data.batch_size=8", "data.eval_batch_size=32", "trainer.limit_val_batches=0.5"]  # 135M on 2 cores
            if backbone == "smollm2_135m"
            else []
        ),  # fmt: skip
    )
    results = train(cfg)
    assert cfg.optimizer.lr == cfg.recipe.lr  # the recipe's rate, as the backbone brought it
    assert results["val/acc_best"] >= 0.6, results["val/acc_best"]  # ≥ 250 val pairs: chance is 0.50 ± 0.063
