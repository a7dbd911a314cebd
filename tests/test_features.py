"""The frozen-trunk feature cache: reading features back gives the rewards a full pass gives."""

from __future__ import annotations

from functools import partial

import numpy as np
import pytest
import torch

from rewardlab import freeze
from rewardlab.backbones import tiny
from rewardlab.data.batching import pad_sequences
from rewardlab.features import FeatureCache, TrunkCache
from rewardlab.train import train

from .conftest import reward_model

FAMILIES = ["llama", "gpt2", "bert"]


def test_feature_cache_round_trip_per_sequence_and_per_token(tmp_path):
    lengths = np.array([3, 1, 2])
    tokens = FeatureCache(tmp_path / "t", lengths, hidden=4, per_token=True)
    values = [torch.arange(n * 4, dtype=torch.bfloat16).reshape(n, 4) + 10 * i for i, n in enumerate(lengths)]
    tokens.store(np.array([2, 0]), [values[2], values[0]])
    assert tokens.lookup(np.array([0, 1])) is None and tokens.stats() == {"hits": 0, "misses": 2, "filled": 2}
    found = tokens.lookup(np.array([0, 2]))
    assert [v.tolist() for v in found] == [values[0].float().tolist(), values[2].float().tolist()]
    assert tokens.dtype == torch.bfloat16 and tokens.stats()["hits"] == 2
    tokens.save()
    again = FeatureCache(tmp_path / "t", lengths, hidden=4, per_token=True)  # a later run finds them, and their dtype
    assert again.lookup(np.array([0, 2])) is not None and again.dtype == torch.bfloat16
    vectors = FeatureCache(tmp_path / "v", lengths, hidden=4, per_token=False)
    vectors.store(np.array([1]), [values[0][:1]])
    assert vectors.lookup(np.array([1]))[0].shape == (1, 4)
    with pytest.raises(ValueError, match="bytes, expected"):
        vectors.store(np.array([0]), [values[0]])


def batch_of(seqs: list[list[int]]) -> dict[str, torch.Tensor]:
    n = len(seqs) // 2
    ids, mask = pad_sequences(seqs, 0)
    return {"input_ids": ids, "attention_mask": mask, "margin": torch.zeros(n), "index": torch.arange(n)}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("strategy", ["head_only", "last_n"])
def test_rewards_from_cached_features_equal_a_full_pass(family, strategy, tmp_path):
    torch.manual_seed(0)
    how = (
        partial(freeze.head_only, cache_features=True)
        if strategy == "head_only"
        else partial(freeze.last_n, n=1, cache_features=True)
    )
    model = reward_model(tiny(family, 32, 3, 4, 64, 128, 0.0).model, how).eval()
    seqs = [[1, 50, 60, 70, 2], [1, 80, 2], [1, 90, 91, 92, 2], [1, 5, 6, 7, 8, 9, 2]]
    lengths = np.array([len(s) for s in seqs])  # sequence 2j is pair j's chosen, 2j + 1 its rejected
    order = [seqs[0], seqs[2], seqs[1], seqs[3]]  # the batch layout: chosen of both pairs, then rejected
    cache = FeatureCache(tmp_path, lengths, 32, per_token=strategy == "last_n")
    trunk = TrunkCache(model.trunk, {"train": cache})
    batch = batch_of(order)
    with torch.no_grad():
        full = model(batch["input_ids"], batch["attention_mask"])
        filling = trunk.outputs(model, batch, "train")[:, 0]
        assert cache.stats() == {"hits": 0, "misses": 4, "filled": 4}
        cached = trunk.outputs(model, batch, "train")[:, 0]
        assert cache.stats()["hits"] == 4
        left = batch_of(order)
        left["input_ids"], left["attention_mask"] = pad_sequences(order, 0, "left")
        cached_left = trunk.outputs(model, left, "train")[:, 0]
    assert torch.allclose(filling, full, atol=1e-5)
    assert torch.allclose(cached, full, atol=1e-5) and torch.allclose(cached_left, full, atol=1e-5)


@pytest.mark.parametrize("strategy", ["head_only", "last_n"])
def test_training_with_the_cache_matches_training_without(strategy, make_cfg, tmp_path):
    runs = {}
    for on in (True, False):
        cfg = make_cfg(
            f"freeze={strategy}",
            f"freeze.cache_features={str(on).lower()}",
            "trainer.max_epochs=3",
            "trainer.limit_train_batches=20",
            "trainer.limit_val_batches=3",
            "backbone.num_layers=3",
            f"model.feature_cache_dir={tmp_path / 'features'}",
            "model.share_prompt=false",  # the cached trunk runs two passes; so must the run it is compared with
            folder=f"cache-{on}",
        )
        runs[on] = train(cfg)
    for key in ("val/loss", "val/acc", "train/loss", "test/acc"):
        assert runs[True][key] == pytest.approx(runs[False][key], abs=1e-5), key
    folders = list((tmp_path / "features").iterdir())
    assert len(folders) == 2  # train and val
    assert all(np.load(f / "filled.npy").sum() > 0 for f in folders)


def test_cache_reused_by_a_later_run_and_off_when_dropout_is_active(make_cfg, tmp_path, caplog):
    common = [
        "freeze=head_only",
        "trainer.max_epochs=1",
        "trainer.limit_train_batches=5",
        f"model.feature_cache_dir={tmp_path / 'f'}",
    ]
    first = train(make_cfg(*common))
    folder = next(p for p in (tmp_path / "f").iterdir() if p.name.startswith("train"))
    filled = np.load(folder / "filled.npy").sum()
    assert filled == 5 * 16 * 2  # 5 batches of 16 pairs, chosen and rejected
    assert first["features/train/misses"] == filled and first["features/train/hits"] == 0
    later = train(make_cfg(*common, folder="later"))  # another job with the same frozen trunk
    assert later["features/train/misses"] == 0 and later["features/train/hits"] == filled
    with caplog.at_level("INFO"):
        train(
            make_cfg(
                "backbone.family=gpt2",
                "backbone.dropout=0.1",
                "model.disable_dropout=false",
                "freeze=last_n",
                *common[1:],
                folder="dropout",
            )
        )
    assert "feature cache off: dropout is active in the frozen part (Dropout)" in caplog.text


def test_feature_cache_key_changes_with_the_frozen_weights(make_cfg, tmp_path):
    for seed in (1, 2):
        train(
            make_cfg(
                "freeze=head_only",
                f"seed={seed}",
                "trainer.limit_train_batches=2",
                f"model.feature_cache_dir={tmp_path / 'f'}",
                folder=f"seed-{seed}",
            )
        )
    assert len([p for p in (tmp_path / "f").iterdir() if p.name.startswith("train")]) == 2
