"""Statistics for comparing estimators over seeds and test points: seed means, paired differences, t intervals.

The inputs are per-point test log-likelihoods, one array per seed, every array on the same test points
in the same order (what ``evaluation.npz`` holds). Two sources of spread are kept apart:

- **across seeds**: the training run's own randomness (initial weights, data order, the estimator's
  draws). With S >= 2 seeds the NLL of an estimator is the mean of its S per-seed NLLs, its standard error
  sd(NLL_s) / sqrt(S), and its 95% interval mean +- t_{0.975, S-1} x SE.
- **across test points**: the standard error of a single run's mean over N points, sd(ll_i) / sqrt(N).
  It is the only spread one seed can show; it says how well the test points pin down *that* trained model.

A paired difference between estimator e and the baseline b uses the same seed and the same points:
d_si = -(ll_e,si - ll_b,si) is the NLL difference at point i under seed s (negative: e is better).

- S >= 2: the per-seed mean differences m_s = mean_i d_si are the replicates; the estimate is their mean
  and the interval mean +- t_{0.975, S-1} x sd(m_s) / sqrt(S).
- S = 1: the per-point differences d_i are the replicates: mean +- t_{0.975, N-1} x sd(d_i) / sqrt(N).

Pairing removes the spread that comes from some test points being harder than others for every model,
so a paired interval can exclude 0 while the two estimators' own intervals overlap.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

LEVEL = 0.95


def t_quantile(df: int, level: float = LEVEL) -> float:
    """The two-sided ``level`` quantile of Student's t with ``df`` degrees of freedom (1.96 as df -> inf)."""
    from scipy.stats import t

    return float(t.ppf(0.5 + level / 2, df))


@dataclass(frozen=True)
class Interval:
    """A mean with its standard error and a t interval, over ``n`` replicates of the kind ``over``."""

    mean: float
    se: float
    low: float
    high: float
    n: int
    over: str   # "seeds" or "points": what the replicates are

    @property
    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0


def mean_interval(values: Sequence[float] | np.ndarray, over: str, level: float = LEVEL) -> Interval:
    """mean +- t_{level, n-1} x sd / sqrt(n) of ``values`` (sd with n - 1); one value has no interval (nan)."""
    v = np.asarray(values, dtype=np.float64)
    if v.ndim != 1 or not len(v):
        raise ValueError("mean_interval needs a non-empty 1-D array")
    mean = float(v.mean())
    if len(v) < 2:
        return Interval(mean, math.nan, math.nan, math.nan, 1, over)
    se = float(v.std(ddof=1) / math.sqrt(len(v)))
    half = t_quantile(len(v) - 1, level) * se
    return Interval(mean, se, mean - half, mean + half, len(v), over)


def _stack(per_seed: Sequence[np.ndarray], what: str) -> np.ndarray:
    arrays = [np.asarray(a, dtype=np.float64) for a in per_seed]
    if not arrays or any(a.ndim != 1 or not len(a) for a in arrays) or len({len(a) for a in arrays}) != 1:
        raise ValueError(f"{what}: one non-empty 1-D array per seed, all of the same length (the same test points)")
    return np.stack(arrays)


@dataclass(frozen=True)
class SeedSummary:
    """An estimator's test NLL over seeds: per-seed NLLs, their mean and interval, and the per-point SE."""

    per_seed: tuple[float, ...]   # NLL of each seed, nats
    interval: Interval            # over seeds when S >= 2, else over points
    seed_se: float                # sd(NLL_s) / sqrt(S); nan with one seed
    point_se: float               # the standard error over test points, averaged over the seeds

    @property
    def mean(self) -> float:
        return self.interval.mean


def nll_summary(log_likelihoods: Sequence[np.ndarray], level: float = LEVEL) -> SeedSummary:
    """The test NLL of one estimator from its per-point log-likelihoods, one array per seed."""
    ll = _stack(log_likelihoods, "nll_summary")
    nll = -ll.mean(1)
    point_se = float(np.mean(ll.std(1, ddof=1) / math.sqrt(ll.shape[1]))) if ll.shape[1] > 1 else math.nan
    if len(nll) >= 2:
        interval = mean_interval(nll, "seeds", level)
    else:
        interval = mean_interval(-ll[0], "points", level)
    return SeedSummary(tuple(float(v) for v in nll), interval, interval.se if len(nll) >= 2 else math.nan,
                       point_se)


def paired_difference(estimator: Sequence[np.ndarray], baseline: Sequence[np.ndarray],
                      level: float = LEVEL) -> Interval:
    """NLL(estimator) - NLL(baseline), paired on the same seed and the same points (negative: better).

    ``estimator[s]`` and ``baseline[s]`` are per-point log-likelihoods of seed s. With two or more seeds
    the interval is over the per-seed mean differences; with one, over the per-point differences."""
    e, b = _stack(estimator, "paired_difference"), _stack(baseline, "paired_difference")
    if e.shape != b.shape:
        raise ValueError(f"paired_difference: {e.shape[0]} seeds x {e.shape[1]} points against "
                         f"{b.shape[0]} x {b.shape[1]}; pairing needs the same seeds and points")
    d = b - e   # per-point NLL difference
    if d.shape[0] >= 2:
        return mean_interval(d.mean(1), "seeds", level)
    return mean_interval(d[0], "points", level)


def how_combined(seeds: int, points: int) -> str:
    """One sentence for a report: how the intervals above were computed."""
    if seeds >= 2:
        return (f"Each estimator's NLL is the mean over {seeds} seeds; ± and the 95% interval are across seeds "
                f"(t with {seeds - 1} degree{'s' * (seeds > 2)} of freedom). Paired differences: the mean over seeds of the per-seed "
                f"mean difference on the same {points} test points, with a t interval across seeds. The "
                "per-point s.e. (the spread over test points, averaged over seeds) is shown for reference.")
    return (f"One seed: ± and the 95% intervals are over the {points} test points (t with {points - 1} degrees "
            "of freedom); paired differences are over the per-point differences on the same points. They say how "
            "well the test points pin down these trained models, not how much another seed would change them.")
