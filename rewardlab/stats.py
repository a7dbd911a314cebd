"""The statistics of an ablation report: a mean over seeds with its confidence interval, and a paired
comparison of two settings scored on the same held-out pairs.

Two sources of noise decide whether a difference is real: which pairs happen to be held out, and
which seed trained the model (the same recipe moves by points from seed to seed). The paired test
resamples both — pairs, the same draw for both settings, and seeds — so a difference that one lucky
seed or a handful of pairs carries does not pass as significant.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import stats

ROUNDS = 10_000  # bootstrap resamples: the smallest p-value reported is 2 / (ROUNDS + 1)
CHUNK = 1000  # resamples drawn at once


def mean_ci(values: list[float], level: float = 0.95) -> tuple[float, float, float]:
    """Mean and its two-sided confidence interval over seeds (Student's t, n − 1 degrees of freedom);
    with one value the interval is unknown (NaN), never zero-width."""
    finite = [v for v in values if v is not None and math.isfinite(v)]
    if not finite:
        return math.nan, math.nan, math.nan
    mean = float(np.mean(finite))
    if len(finite) < 2:
        return mean, math.nan, math.nan
    half = float(stats.t.ppf(0.5 + level / 2, len(finite) - 1) * stats.sem(finite))
    return mean, mean - half, mean + half


@dataclass(frozen=True)
class Paired:
    diff: float  # accuracy of `a` minus accuracy of `b`, over all their seeds, on the shared pairs
    ci_low: float
    ci_high: float
    p: float  # two-sided: the chance of a difference this far from 0 if the settings were alike
    pairs: int  # held-out pairs both were scored on


def paired_bootstrap(
    a: np.ndarray, b: np.ndarray, seeds_paired: bool, rounds: int = ROUNDS, level: float = 0.95, rng_seed: int = 0
) -> Paired:
    """Compare two settings' per-pair outcomes, `a` (seeds × pairs, 1 = right) and `b`, on the same pairs.

    Each round draws the pairs with replacement (one draw for both: the comparison stays paired) and
    each setting's seeds with replacement (one draw for both when `seeds_paired`, i.e. seed s of `a` and
    of `b` share their data order and initialisation). The CI is the percentile interval of the
    resampled differences; the p-value is twice the smaller tail beyond 0, counting the observed
    difference as one more resample."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or a.shape[1] == 0:
        raise ValueError(
            f"paired_bootstrap: expected seeds × pairs arrays over the same pairs, got {a.shape}, {b.shape}"
        )
    if seeds_paired and a.shape[0] != b.shape[0]:
        raise ValueError("paired_bootstrap: paired seeds need the same number of seeds on both sides")
    # Pairs with the same outcomes on every seed of both are interchangeable: drawing n pairs with
    # replacement is drawing counts of each distinct outcome pattern (at most 2^seeds of them, so the
    # cost does not grow with the number of pairs).
    patterns, counts = np.unique(np.vstack([a, b]).T, axis=0, return_counts=True)
    a_patterns, b_patterns = patterns[:, : a.shape[0]].T, patterns[:, a.shape[0] :].T
    rng = np.random.default_rng(rng_seed)
    resampled = np.concatenate(
        [
            _resample(a_patterns, b_patterns, counts, seeds_paired, min(CHUNK, rounds - done), rng)
            for done in range(0, rounds, CHUNK)
        ]
    )
    diff = float(a.mean() - b.mean())
    tail = (1 - level) / 2
    low, high = np.quantile(resampled, [tail, 1 - tail])
    below, above = int((resampled <= 0).sum()), int((resampled >= 0).sum())
    p = min(1.0, 2 * (min(below, above) + 1) / (rounds + 1))
    return Paired(diff, float(low), float(high), p, a.shape[1])


def _weights(rounds: int, n: int, rng: np.random.Generator) -> np.ndarray:
    """Each row: how often each of `n` items is drawn in `n` draws with replacement, over `n`."""
    return rng.multinomial(n, np.full(n, 1 / n), size=rounds) / n


def _resample(
    a: np.ndarray, b: np.ndarray, counts: np.ndarray, seeds_paired: bool, rounds: int, rng: np.random.Generator
) -> np.ndarray:
    """`rounds` resampled differences; `a` and `b` are seeds × outcome patterns, `counts` each pattern's pairs."""
    n = int(counts.sum())
    pairs = rng.multinomial(n, counts / n, size=rounds) / n
    seeds_a = _weights(rounds, a.shape[0], rng)
    seeds_b = seeds_a if seeds_paired else _weights(rounds, b.shape[0], rng)
    return ((seeds_a @ a) * pairs).sum(1) - ((seeds_b @ b) * pairs).sum(1)
