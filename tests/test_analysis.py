"""Length and uncertainty analyses of held-out pairs (`rewardlab.analysis`, the epoch metrics, eval's
length calibration), on hand-computed cases."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from rewardlab.analysis import auroc, gap_bins, length_accuracy, length_slope, uncertainty_accuracy
from rewardlab.eval import length_calibrated
from rewardlab.metrics import PairMetrics, PairOutcomes

MARGIN = np.array([1.0, -1.0, 2.0, -0.5, 0.3])
CHOSEN = np.array([10, 5, 3, 8, 4])
REJECTED = np.array([5, 5, 9, 2, 4])  # gaps 5, 0, -6, 6, 0


def test_length_accuracy_by_direction_and_its_mean():
    found = length_accuracy(MARGIN, CHOSEN, REJECTED)
    # chosen longer: pairs 0 (right) and 3 (wrong); chosen shorter: pair 2 (right); 1 and 4 equal length
    assert found == {
        "acc_chosen_longer": 0.5,
        "acc_chosen_shorter": 1.0,
        "acc_length_controlled": 0.75,
        "pairs_chosen_longer": 2,
        "pairs_chosen_shorter": 1,
        "pairs_same_length": 2,
    }
    assert math.isnan(length_accuracy(MARGIN[:2], CHOSEN[:2], REJECTED[:2])["acc_chosen_shorter"])


def test_longer_always_wins_scores_one_half_length_controlled():
    chosen, rejected = np.array([9, 2, 7, 1]), np.array([3, 8, 2, 6])
    margin = (chosen - rejected).astype(float)  # a reward that is the length
    assert length_accuracy(margin, chosen, rejected)["acc_length_controlled"] == 0.5


def test_gap_bins_cover_every_pair_once():
    table = gap_bins(MARGIN, CHOSEN, REJECTED, [-1, 1])
    assert table == [
        {"low": None, "high": -1, "pairs": 1, "accuracy": 1.0},  # pair 2
        {"low": -1, "high": 1, "pairs": 2, "accuracy": 0.5},  # pairs 1 and 4: equal length
        {"low": 1, "high": None, "pairs": 2, "accuracy": 0.5},  # pairs 0 and 3
    ]
    assert math.isnan(gap_bins(MARGIN, CHOSEN, REJECTED, [100])[1]["accuracy"])
    # eval's default edges: a gap of -1 is "shorter by 1..15", 0 alone is "same length", +1 "longer by 1..15"
    edges = [-63, -15, 0, 1, 16, 64]
    table = gap_bins(np.ones(3), np.array([4, 5, 6]), np.array([5, 5, 5]), edges)
    assert [row["pairs"] for row in table] == [0, 0, 1, 1, 1, 0, 0]
    with pytest.raises(ValueError, match="must increase"):
        gap_bins(MARGIN, CHOSEN, REJECTED, [1, -1])


def test_auroc_counts_ordered_pairs_and_ties_half():
    # positives 0.35 and 0.8 against negatives 0.1 and 0.4: 3 of 4 orderings right
    assert auroc(np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1])) == 0.75
    assert auroc(np.array([1.0, 1.0]), np.array([1, 0])) == 0.5
    assert math.isnan(auroc(np.array([1.0, 2.0]), np.array([0, 0])))


def test_uncertainty_accuracy_by_quantile_and_auroc():
    found = uncertainty_accuracy(np.array([1.0, -1, 1, -1]), np.array([0.1, 0.9, 0.2, 0.8]), 2)
    assert found["uncertainty_mean"] == pytest.approx(0.5) and found["uncertainty_auroc"] == 1.0
    assert found["margin_auroc"] == 0.5  # every |margin| is 1: the margin alone cannot rank them
    assert found["accuracy_by_uncertainty"] == [
        {"quantile": 1, "low": 0.1, "high": 0.2, "pairs": 2, "accuracy": 1.0},
        {"quantile": 2, "low": 0.8, "high": 0.9, "pairs": 2, "accuracy": 0.0},
    ]


def test_length_slope_and_calibration_remove_a_linear_length_trend():
    assert length_slope(np.array([2.0, 4, 6]), np.array([1, 2, 3])) == pytest.approx(2.0)
    assert length_slope(np.array([2.0, 4]), np.array([3, 3])) == 0.0

    def split(chosen: list[int], rejected: list[int]) -> SimpleNamespace:  # prompts of 2 tokens
        return SimpleNamespace(seq_lengths=np.array([chosen, rejected]).T + 2, prompt_lengths=np.full(len(chosen), 2))

    # reference split: reward = 0.5 per response token exactly -> slope 0.5
    ref = split([4, 10], [2, 6])
    reference = {"index": np.arange(2), "chosen": np.array([2.0, 5.0]), "rejected": np.array([1.0, 3.0])}
    # evaluated split: quality q plus 0.5 per token; chosen shorter in pair 0, longer in pair 1
    here = split([2, 8], [6, 4])
    quality_c, quality_r = np.array([1.0, 1.0]), np.array([0.0, 0.0])
    scores = {"index": np.arange(2), "chosen": quality_c + 0.5 * np.array([2, 8]),
              "rejected": quality_r + 0.5 * np.array([6, 4])}  # fmt: skip
    assert (scores["chosen"] > scores["rejected"]).tolist() == [False, True]  # length wins pair 0
    found = length_calibrated(scores, here, reference, ref)
    assert found["slope_per_token"] == pytest.approx(0.5)
    assert found["accuracy"] == 1.0 and found["acc_length_controlled"] == 1.0


def test_epoch_metrics_give_length_controlled_accuracy_correlation_and_uncertainty_in_any_batching():
    chosen, rejected = torch.tensor([1.0, 0.0, 3.0]), torch.tensor([0.0, 1.0, 2.0])
    tokens = torch.tensor([5, 2, 4, 3, 6, 4])  # chosen's, then rejected's: gaps 2, -4, 0
    spread = torch.tensor([0.1, 0.3, 0.2])
    whole, parts = PairMetrics(), PairMetrics()
    whole.update(chosen, rejected, torch.tensor(0.5), tokens, spread)
    parts.update(chosen[:2], rejected[:2], torch.tensor(0.5), torch.tensor([5, 2, 3, 6]), spread[:2])
    parts.update(chosen[2:], rejected[2:], torch.tensor(0.5), torch.tensor([4, 4]), spread[2:])
    a, b = whole.compute(), parts.compute()
    assert a["acc_chosen_longer"] == 1.0 and a["acc_chosen_shorter"] == 0.0 and a["acc_length_controlled"] == 0.5
    expected = np.corrcoef([5, 2, 4, 3, 6, 4], [1, 0, 3, 0, 1, 2])[0, 1]
    assert a["length_reward_corr"].item() == pytest.approx(expected)
    assert a["uncertainty"].item() == pytest.approx(0.2)
    assert all(torch.allclose(a[k], b[k]) for k in a)
    bare = PairMetrics()
    bare.update(chosen, rejected, torch.tensor(0.5))
    assert set(bare.compute()) == {"loss", "acc", "margin", "reward_chosen", "reward_rejected", "reward_std"}


def test_outcomes_keep_each_pair_once_with_its_lengths_and_uncertainty():
    outcomes = PairOutcomes()
    chosen, rejected = torch.tensor([1.5, 0.0]), torch.tensor([1.0, 1.0])
    outcomes.update(torch.tensor([3, 1]), chosen, rejected, torch.tensor([7, 8, 2, 9]), None)
    outcomes.update(torch.tensor([1]), chosen[1:], rejected[1:], torch.tensor([8, 9]), None)  # a repeated pair
    found = outcomes.compute()
    assert found["index"].tolist() == [1, 3] and found["margin"].tolist() == [-1.0, 0.5]
    assert found["chosen"].tolist() == [0.0, 1.5] and found["rejected"].tolist() == [1.0, 1.0]
    assert found["chosen_tokens"].tolist() == [8, 7] and found["rejected_tokens"].tolist() == [9, 2]
    assert found["uncertainty"].isnan().all()
    empty = PairOutcomes().compute()  # a rank with no test batch: indices stay integers
    assert empty["index"].dtype == torch.long and len(empty["margin"]) == 0
