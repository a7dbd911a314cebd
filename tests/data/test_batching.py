"""Batches: stacking, padding, length grouping, sharding and token budgets."""

from __future__ import annotations

import math

import numpy as np
import pytest

from rewardlab.data.batching import LengthGroupedBatchSampler, PairCollator
from rewardlab.data.rows import DataError


def test_collator_pads_right_or_left_and_stacks_chosen_then_rejected():
    items = [
        {"chosen": np.array([5, 6, 7]), "rejected": np.array([8]), "margin": 1.0, "index": 0},
        {"chosen": np.array([9, 9]), "rejected": np.array([4, 4, 4, 4]), "margin": float("nan"), "index": 1},
    ]
    right = PairCollator(pad_id=0)(items)
    assert right["input_ids"].tolist() == [[5, 6, 7, 0], [9, 9, 0, 0], [8, 0, 0, 0], [4, 4, 4, 4]]
    assert right["attention_mask"].sum(1).tolist() == [3, 2, 1, 4]
    left = PairCollator(pad_id=0, padding_side="left", pad_to_multiple_of=8)(items)
    assert left["input_ids"].shape == (4, 8) and left["input_ids"][0].tolist() == [0] * 5 + [5, 6, 7]
    assert right["margin"][0] == 1.0 and math.isnan(right["margin"][1])


def test_length_grouped_batches_cover_every_pair_once_and_cut_padding():
    rng = np.random.default_rng(0)
    lengths = rng.integers(5, 500, size=1000)
    grouped = LengthGroupedBatchSampler(lengths, 16, shuffle=True, group_by_length=True, group_batches=50, seed=1)
    plain = LengthGroupedBatchSampler(lengths, 16, shuffle=True, group_by_length=False, group_batches=50, seed=1)

    def efficiency(batches):
        return sum(lengths[b].sum() for b in batches) / sum(lengths[b].max() * len(b) for b in batches)

    epoch0 = list(grouped)
    assert sorted(i for b in epoch0 for i in b) == list(range(1000)) and len(epoch0) == len(grouped) == 63
    assert efficiency(epoch0) > 0.95 > 0.7 > efficiency(list(plain))
    grouped.set_epoch(1)
    assert list(grouped) != epoch0
    grouped.set_epoch(0)
    assert list(grouped) == epoch0


def test_sampler_shards_each_batch_across_ranks():
    lengths = np.arange(10)
    ranks = [list(LengthGroupedBatchSampler(lengths, 4, True, True, 2, seed=3, rank=r, world_size=2)) for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == 3
    assert sorted(i for batches in ranks for b in batches for i in b) == list(range(10))
    with pytest.raises(DataError, match="batch_size=3 must divide by the world size 2"):
        LengthGroupedBatchSampler(lengths, 3, True, True, 2, seed=3, rank=0, world_size=2)


def test_eval_batches_are_sorted_longest_first():
    batches = list(LengthGroupedBatchSampler(np.array([3, 9, 1, 7]), 2, False, True, 50, seed=0))
    assert batches == [[1, 3], [0, 2]]


def test_eval_batches_respect_a_token_budget():
    lengths = np.array([100, 10, 10, 10, 10, 50, 10, 10])
    sampler = LengthGroupedBatchSampler(lengths, 4, False, True, 50, seed=0, max_tokens=200)
    batches = list(sampler)
    assert batches[0] == [0]  # 2 sequences × 100 tokens fill the budget
    assert batches[1] == [5, 1] and batches[2] == [2, 3, 4, 6]  # 2 pairs × 2 × 50 = 200; then the cap of 4 pairs
    assert sorted(i for b in batches for i in b) == list(range(8)) and len(sampler) == len(batches) == 4
    ranked = [list(LengthGroupedBatchSampler(lengths, 4, False, True, 50, 0, r, 2, max_tokens=200)) for r in (0, 1)]
    assert len(ranked[0]) == len(ranked[1]) and sorted(i for rk in ranked for b in rk for i in b) == list(range(8))
