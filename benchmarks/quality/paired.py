"""Paired statistics for method comparisons: every method is trained with the same seeds and the same data
order per seed, so each seed gives one paired difference to the baseline.

For a metric where higher is better (accuracy) a positive difference favours the method; for perplexity
the sign is flipped so that "improvement" is always positive. Intervals are Student-t 95 % intervals of
the mean paired difference; p-values are two-sided paired t-tests; Holm's step-down correction controls
the family-wise error over the primary contrasts named before the run.
"""

from __future__ import annotations

import numpy as np
from scipy import stats


def paired_difference(method: np.ndarray, baseline: np.ndarray, higher_is_better: bool) -> dict:
    """Mean improvement over the baseline, its 95 % t interval and the paired t-test p-value."""
    difference = (method - baseline) if higher_is_better else (baseline - method)
    n = len(difference)
    mean = float(difference.mean())
    if n < 2:
        return {"improvement": mean, "ci_low": float("nan"), "ci_high": float("nan"), "p": float("nan"), "n": n}
    sem = float(difference.std(ddof=1)) / np.sqrt(n)
    if sem == 0.0:
        p = 1.0 if mean == 0.0 else 0.0
        half = 0.0
    else:
        p = float(2 * stats.t.sf(abs(mean / sem), n - 1))
        half = float(stats.t.ppf(0.975, n - 1)) * sem
    return {"improvement": mean, "ci_low": mean - half, "ci_high": mean + half, "p": p, "n": n}


def holm(p_values: dict[str, float]) -> dict[str, float]:
    """Holm-adjusted p-values (step-down, monotone), same keys."""
    order = sorted(p_values, key=lambda key: p_values[key])
    adjusted, running = {}, 0.0
    for rank, key in enumerate(order):
        running = max(running, min(1.0, (len(order) - rank) * p_values[key]))
        adjusted[key] = running
    return adjusted


def one_sided(contrast: dict) -> float:
    """The one-sided p-value of an improvement > 0 from a two-sided paired test (``paired_difference``)."""
    p = contrast["p"]
    return p / 2 if contrast["improvement"] > 0 else 1 - p / 2


def stouffer(one_sided_p: list[float]) -> tuple[float, float]:
    """Stouffer's combination of independent one-sided p-values (one per task): (Z, its one-sided p)."""
    z = float(np.sum(stats.norm.isf(np.clip(one_sided_p, 1e-300, 1 - 1e-16))) / np.sqrt(len(one_sided_p)))
    return z, float(stats.norm.sf(z))
