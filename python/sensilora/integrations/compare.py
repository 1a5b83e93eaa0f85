"""How alike two allocations are: the paper's claim that calibration sets barely matter."""

from __future__ import annotations

import numpy as np

from ..allocation.combination import normalised_ranks
from ..allocation.result import RankAllocation
from ..errors import SensiloraError


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation with average ranks for ties (nan when either side is constant)."""
    ra, rb = normalised_ranks(a), normalised_ranks(b)  # scale-free: Spearman is unchanged
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denominator = float(np.sqrt((ra * ra).sum() * (rb * rb).sum()))
    return float((ra * rb).sum() / denominator) if denominator else float("nan")


def compare_allocations(first: RankAllocation, second: RankAllocation) -> dict:
    """Spearman correlation of theta, rank differences and the modules whose ranks differ."""
    common = [name for name in first.ranks if name in second.ranks]
    if not common:
        raise SensiloraError("the two allocations share no module; were they made for the same model?")
    theta_a = np.array([first.theta[n] for n in common])
    theta_b = np.array([second.theta[n] for n in common])
    diffs = {n: second.ranks[n] - first.ranks[n] for n in common}
    differing = {n: d for n, d in diffs.items() if d}
    return {
        "modules": len(common),
        "only_in_first": sorted(set(first.ranks) - set(second.ranks)),
        "only_in_second": sorted(set(second.ranks) - set(first.ranks)),
        "spearman_theta": spearman(theta_a, theta_b),
        "max_abs_rank_difference": max((abs(d) for d in diffs.values()), default=0),
        "mean_abs_rank_difference": float(np.mean([abs(d) for d in diffs.values()])),
        "modules_differing": len(differing),
        "differences": dict(sorted(differing.items(), key=lambda item: (-abs(item[1]), item[0]))),
        "warnings": provenance_differences(first, second),
    }


PROVENANCE = {
    "model_config_sha256": "the model configurations differ",
    "data_sha256": "the calibration tokens differ",
    "calibration_files": "the calibration files differ",
    "statistic": "the statistics differ",
    "exclude_first": "the excluded sequence starts differ",
}


def provenance_differences(first: RankAllocation, second: RankAllocation) -> list[str]:
    """One line per recorded fact on which the two ranks files differ (model, data, settings, version)."""
    notes = []
    for key, what in PROVENANCE.items():
        a, b = first.calibration.get(key), second.calibration.get(key)
        if a != b:
            notes.append(f"{what} ({key}: {a!r} vs {b!r})")
    if first.mode != second.mode:
        notes.append(f"the statistics modes differ ({first.mode} vs {second.mode})")
    if first.config != second.config:
        changed = {
            k: (v, second.config.to_dict()[k])
            for k, v in first.config.to_dict().items()
            if v != second.config.to_dict()[k]
        }
        notes.append(f"the allocation configs differ: {changed}")
    if first.version != second.version:
        notes.append(f"written by different sensilora versions ({first.version} vs {second.version})")
    return notes
