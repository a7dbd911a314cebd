"""Batches: stacking, padding, length grouping, sharding and token budgets."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rewardlab.data.batching import LengthGroupedBatchSampler, PairCollator, length_chunks
from rewardlab.data.rows import DataError


def test_collator_pads_right_or_left_and_stacks_chosen_then_rejected():
    items = [
        {"chosen": np.array([5, 6, 7]), "rejected": np.array([8]), "margin": 1.0, "index": 0},
        {"chosen": np.array([9, 9]), "rejected": np.array([4, 4, 4, 4]), "margin": float("nan"), "index": 1},
    ]
    right = PairCollator(0, "right", None, 1, 0)(items)
    assert right["input_ids"].tolist() == [[5, 6, 7, 0], [9, 9, 0, 0], [8, 0, 0, 0], [4, 4, 4, 4]]
    assert right["attention_mask"].sum(1).tolist() == [3, 2, 1, 4]
    left = PairCollator(0, "left", 8, 1, 0)(items)
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


@settings(max_examples=60, deadline=None)
@given(
    lengths=st.lists(st.integers(1, 300), min_size=1, max_size=120),
    budget=st.integers(2, 2000),
    world=st.sampled_from([1, 2]),
    epoch=st.integers(0, 3),
)
def test_training_batches_under_a_token_budget(lengths, budget, world, epoch):
    """Every pair once per epoch; a batch over the budget only where it holds one pair per device;
    never more than batch_size pairs; sizes divide by the world; as many batches as the sampler says."""
    lengths = np.array(lengths)
    sampler = LengthGroupedBatchSampler(lengths, 8, True, True, 4, seed=epoch, world_size=world, max_tokens=budget)
    sampler.set_epoch(epoch)
    batches = sampler.batches()
    assert sorted(i for b in batches for i in b) == list(range(len(lengths))) and len(sampler) == len(batches)
    for b in batches:
        assert len(b) <= 8 and (2 * len(b) * lengths[b].max() <= budget or len(b) <= world)
    assert sum(len(b) % world != 0 for b in batches) <= 1  # only the order's last batch may not divide


def test_a_token_budget_gives_short_pairs_full_batches_and_long_ones_small():
    lengths = np.array([200] * 8 + [20] * 32)
    batches = LengthGroupedBatchSampler(lengths, 8, True, True, 50, seed=0, max_tokens=1000).batches()
    sizes = sorted((len(b), int(lengths[b].max())) for b in batches)
    assert sizes == [(2, 200)] * 4 + [(8, 20)] * 4  # 2 × 2 × 200 = 800 fit 1000; 3 pairs would be 1200


@settings(max_examples=100, deadline=None)
@given(
    lengths=st.lists(st.integers(1, 300), min_size=1, max_size=40),
    max_chunks=st.integers(1, 5),
    overhead=st.integers(0, 500),
)
def test_length_chunks_cover_every_sequence_once_and_never_cost_more_than_one_pass(lengths, max_chunks, overhead):
    lengths = np.array(lengths)
    groups = length_chunks(lengths, max_chunks, overhead)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths))) and 1 <= len(groups) <= max_chunks
    cost = sum(len(g) * lengths[g].max() + overhead for g in groups)
    assert cost <= len(lengths) * lengths.max() + overhead
    spans = [(lengths[g].min(), lengths[g].max()) for g in groups]
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))  # groups of similar length, in order


def test_a_batch_in_chunks_counts_the_tokens_its_passes_process():
    items = [
        {"chosen": np.arange(1, 101), "rejected": np.array([5, 6]), "margin": 0.0, "index": 0},
        {"chosen": np.arange(1, 99), "rejected": np.array([7, 8, 9]), "margin": 0.0, "index": 1},
    ]
    one = PairCollator(0, "right", None, 1, 0)(items)
    split = PairCollator(0, "right", None, 4, 10)(items)
    assert one["padded_tokens"] == 4 * 100 and "chunks" not in one
    assert [sorted(c.tolist()) for c in split["chunks"]] == [[2, 3], [0, 1]] and split["chunk_widths"] == [3, 100]
    assert split["padded_tokens"] == 2 * 3 + 2 * 100
