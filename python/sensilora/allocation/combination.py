"""From metrics to theta (METHOD.md section 3): the combination weights of eqs. 11-14 and its variants."""

from __future__ import annotations

import numpy as np

from .budgets import assign_ranks
from .config import AGGREGATIONS, METRIC_SETS, WEIGHTINGS, AllocationConfig, check_choice
from .metrics import METRIC_LABELS, ModuleMetrics


def _coefficient(values: np.ndarray, weighting: str) -> float:
    """eq. 11/13: std/mean^2 ("cv") or 0.5/mean ("equal"); 0 for an all-zero metric."""
    mean = float(values.mean())
    if mean == 0.0:
        return 0.0
    return float(values.std()) / mean**2 if weighting == "cv" else 0.5 / mean


def normalised_ranks(values: np.ndarray) -> np.ndarray:
    """Average ranks (ties share one) divided by the count: (n,) -> (n,) in (0, 1], order kept."""
    _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    return (ends - (counts - 1) / 2.0)[inverse] / len(values)


def combine(
    metrics: dict[str, ModuleMetrics],
    metric_set: str = "both",
    weighting: str = "cv",
    aggregation: str = "paper",
    temperature: float = 1.0,
) -> dict[str, float]:
    """theta per module (eqs. 11-14), or S_global / S_local alone for the paper's ablations.

    aggregation="rank" replaces each metric by its normalised rank before combining (METHOD.md 3b);
    temperature raises theta to that power (1: unchanged, 0: uniform).
    """
    check_choice("metrics", metric_set, METRIC_SETS)
    check_choice("weighting", weighting, WEIGHTINGS)
    check_choice("aggregation", aggregation, AGGREGATIONS)
    names = list(metrics)
    columns = [
        np.array([getattr(metrics[n], field) for n in names], dtype=np.float64)
        for field in ("global_sensitivity", "topk", "effective_rank")
    ]
    if aggregation == "rank":
        columns = [normalised_ranks(column) for column in columns]
    global_s, topk, eff = columns
    local = _coefficient(topk, weighting) * topk + _coefficient(eff, weighting) * eff
    if metric_set == "global":
        theta = global_s
    elif metric_set == "local":
        theta = local
    else:
        theta = _coefficient(global_s, weighting) * global_s + _coefficient(local, weighting) * local
    if temperature != 1.0:
        theta = np.power(np.maximum(theta, 0.0), temperature)
    return dict(zip(names, theta.tolist()))


def per_metric_ranks(metrics: dict[str, ModuleMetrics], shapes, config: AllocationConfig) -> dict[str, dict[str, int]]:
    """The ranks each metric alone would give under ``config`` (SRA), for the paper's Figure 3 panels."""
    sra = config.replace(method="sra")
    return {
        label: assign_ranks({n: float(getattr(m, field)) for n, m in metrics.items()}, shapes, sra)
        for field, label in METRIC_LABELS.items()
    }
