"""Summary statistics and significance tests for per-seed accuracies.

Every cell of a results table is a mean over seeds with its sample standard deviation and a 95 %
confidence interval from Student's t (``mean +- t_{0.975, n-1} * std / sqrt(n)``). Two methods are
compared with Welch's t-test (unequal variances) and, where both ran the same seeds, a paired
t-test by seed (same initialization and data order, so the pairing removes the seed's share of
the variance).
"""

from __future__ import annotations

import math
import statistics
from typing import NamedTuple


class CellSummary(NamedTuple):
    mean: float
    std: float
    ci95: float  # half-width of the 95 % interval; nan with fewer than 2 values
    n: int


def summarize(values: list[float]) -> CellSummary:
    """Mean, sample std and 95 % interval half-width of the finite ``values``."""
    finite = [v for v in values if v is not None and math.isfinite(v)]
    n = len(finite)
    if n == 0:
        return CellSummary(float("nan"), float("nan"), float("nan"), 0)
    if n == 1:
        return CellSummary(finite[0], 0.0, float("nan"), 1)
    from scipy import stats

    std = statistics.stdev(finite)
    return CellSummary(statistics.fmean(finite), std, float(stats.t.ppf(0.975, n - 1)) * std / math.sqrt(n), n)


def compare(a: dict[int, float], b: dict[int, float]) -> dict:
    """``a - b`` for two methods' accuracies by seed: difference, Welch's and the paired p-value.

    Returns a dict with ``diff`` (difference of the means), ``welch_p``, ``paired_p`` (over the
    seeds both have; nan with fewer than 2 pairs) and ``n_a``, ``n_b``, ``n_pairs``.
    """
    from scipy import stats

    xs = [v for v in a.values() if math.isfinite(v)]
    ys = [v for v in b.values() if math.isfinite(v)]
    pairs = [(a[s], b[s]) for s in sorted(set(a) & set(b)) if math.isfinite(a[s]) and math.isfinite(b[s])]
    nan = float("nan")
    result = {"diff": (statistics.fmean(xs) - statistics.fmean(ys)) if xs and ys else nan,
              "welch_p": nan, "paired_p": nan, "n_a": len(xs), "n_b": len(ys), "n_pairs": len(pairs)}
    if len(xs) >= 2 and len(ys) >= 2:
        result["welch_p"] = _p_value(stats.ttest_ind(xs, ys, equal_var=False))
    if len(pairs) >= 2:
        result["paired_p"] = _p_value(stats.ttest_rel([p[0] for p in pairs], [p[1] for p in pairs]))
    return result


def _p_value(test) -> float:
    # Identical samples (zero variance) give nan: no evidence either way.
    p = float(test.pvalue)
    return p if math.isfinite(p) else float("nan")
