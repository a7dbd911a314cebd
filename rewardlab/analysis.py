"""What a reward model's held-out pairs say beyond accuracy: how much of it is length (accuracy where
the chosen response is the longer vs the shorter, by length gap, length-controlled), and whether an
ensemble's uncertainty knows when it is wrong (AUROC, accuracy by uncertainty quantile). Used by
`rewardlab.eval` (eval.json) and by training's test (results.json)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from scipy.stats import rankdata


def pearson(x: np.ndarray, y: np.ndarray) -> float:
    """Pearson correlation; NaN when either side is constant (the epoch metrics compute the same from sums,
    `rewardlab.metrics.PairMetrics`; ODIN's differentiable one is `rewardlab.heads.pearson`)."""
    return float(np.corrcoef(x, y)[0, 1]) if len(x) > 1 and x.std() > 0 and y.std() > 0 else math.nan


def _acc(correct: np.ndarray) -> float:
    return float(correct.mean()) if len(correct) else math.nan


def length_accuracy(margin: np.ndarray, chosen_tokens: np.ndarray, rejected_tokens: np.ndarray) -> dict[str, float]:
    """Accuracy (a tie is wrong) on pairs whose chosen response has more response tokens than the
    rejected one, on those where it has fewer, and their mean: the length-controlled accuracy, which
    "always prefer the longer" scores 0.5 on and a length-blind model scores its accuracy on. Pairs of
    equal length count in neither; NaN where a side has no pair."""
    gap = chosen_tokens.astype(np.int64) - rejected_tokens.astype(np.int64)
    correct = margin > 0
    longer, shorter = _acc(correct[gap > 0]), _acc(correct[gap < 0])
    return {
        "acc_chosen_longer": longer,
        "acc_chosen_shorter": shorter,
        "acc_length_controlled": (longer + shorter) / 2,
        "pairs_chosen_longer": int((gap > 0).sum()),
        "pairs_chosen_shorter": int((gap < 0).sum()),
        "pairs_same_length": int((gap == 0).sum()),
    }


def gap_bins(
    margin: np.ndarray, chosen_tokens: np.ndarray, rejected_tokens: np.ndarray, edges: list[int]
) -> list[dict[str, Any]]:
    """Accuracy per bin of the length gap (chosen minus rejected response tokens): below edges[0],
    [edges[i], edges[i+1]), and from edges[-1] up (an open end is None). Empty bins are listed with 0 pairs
    and accuracy NaN."""
    if list(edges) != sorted(set(edges)):
        raise ValueError(f"length gap edges must increase, got {list(edges)}")
    gap = chosen_tokens.astype(np.int64) - rejected_tokens.astype(np.int64)
    bounds = [None, *edges, None]
    table = []
    for low, high in zip(bounds[:-1], bounds[1:]):
        inside = np.ones(len(gap), bool) if low is None else gap >= low
        inside &= True if high is None else gap < high
        table.append({"low": low, "high": high, "pairs": int(inside.sum()), "accuracy": _acc(margin[inside] > 0)})
    return table


def auroc(score: np.ndarray, positive: np.ndarray) -> float:
    """Area under the ROC curve of `score` as a predictor of `positive` (Mann–Whitney U, ties counted
    half): 0.5 is chance, 1 a perfect ranking; NaN without both classes."""
    positive = positive.astype(bool)
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if not n_pos or not n_neg:
        return math.nan
    ranks = rankdata(score)
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def uncertainty_accuracy(margin: np.ndarray, uncertainty: np.ndarray, quantiles: int) -> dict[str, Any]:
    """Mean uncertainty, its AUROC as a predictor of a wrong pair (margin ≤ 0), and accuracy within each
    of `quantiles` equal-count groups of pairs from the least to the most uncertain. For comparison, the
    AUROC of the model's own confidence (a small |margin|): what the uncertainty must beat to add anything.
    The heads' spread grows with the size of the margins they share, so on a shared trunk it can rank
    below chance where the margin alone ranks above."""
    wrong = margin <= 0
    order = np.argsort(uncertainty, kind="stable")
    table = []
    for q, part in enumerate(np.array_split(order, quantiles)):
        if len(part):
            table.append(
                {
                    "quantile": q + 1,
                    "low": float(uncertainty[part].min()),
                    "high": float(uncertainty[part].max()),
                    "pairs": int(len(part)),
                    "accuracy": _acc(margin[part] > 0),
                }
            )
    return {
        "uncertainty_mean": float(uncertainty.mean()) if len(uncertainty) else math.nan,
        "uncertainty_auroc": auroc(uncertainty, wrong),
        "margin_auroc": auroc(-np.abs(margin), wrong),
        "accuracy_by_uncertainty": table,
    }


def length_slope(rewards: np.ndarray, tokens: np.ndarray) -> float:
    """The least-squares slope of reward on response tokens (reward per token); 0 when lengths do not vary."""
    x = tokens.astype(float) - tokens.mean()
    return float((x * (rewards - rewards.mean())).sum() / (x * x).sum()) if (x * x).sum() > 0 else 0.0


def attribute_errors(predicted: np.ndarray, targets: np.ndarray, names: list[str]) -> dict[str, float]:
    """Per attribute, of predicted ratings against the data's `(responses, attributes)`: the root mean squared
    error (in the ratings' units) and Spearman's rank correlation (ties ranked by their mean rank)."""
    out = {}
    for a, name in enumerate(names):
        out[f"rmse_{name}"] = float(np.sqrt(np.mean((predicted[:, a] - targets[:, a]) ** 2)))
        out[f"spearman_{name}"] = pearson(rankdata(predicted[:, a]), rankdata(targets[:, a]))
    return out
