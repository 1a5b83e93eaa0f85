"""The screen's view of the allocation rules (``screen.py``): each returns ``{module name: rank}`` at
uniform LoRA's trainable-parameter budget ``avg_rank * sum(d_out + d_in)``. The rules themselves are the
library's (``sensilora.allocation.rules``, METHOD.md section 4b: the structural prior, pooling, GoRA, the
whitened gradient spectrum and its greedy); here they are applied to the screen's inputs, with what only
the screen needs: the teacher's whitened update spectra and the share of them an allocation captures, and
the stability measures between calibration halves.
"""

from __future__ import annotations

import numpy as np
import torch
from sensilora.allocation import rules
from sensilora.allocation.budgets import largest_rank, sra_ranks


def parameter_budget(shapes: dict[str, tuple[int, int]], avg_rank: int) -> int:
    return avg_rank * sum(d_out + d_in for d_out, d_in in shapes.values())


def greedy_ranks(values: dict[str, np.ndarray], shapes: dict[str, tuple[int, int]], avg_rank: int) -> dict[str, int]:
    """The library's greedy by worth per parameter (rank 1 each first) at uniform LoRA's budget, no rank
    above ``largest_rank``."""
    ceilings = {name: largest_rank(*shape) for name, shape in shapes.items()}
    return rules.greedy_ranks(values, shapes, parameter_budget(shapes, avg_rank), ceilings)


def captured(ranks: dict[str, int], energies: dict[str, np.ndarray]) -> float:
    """The share of ``sum_m sum_k energies[m][k]`` held by the top ``ranks[m]`` units of each matrix."""
    total = sum(float(e.sum()) for e in energies.values())
    return sum(float(energies[n][: ranks[n]].sum()) for n in energies) / total


def whitened_spectrum(matrix: torch.Tensor, hessian_diag: torch.Tensor, power: float) -> np.ndarray:
    """Squared singular values of ``matrix diag(h)^power`` (float64), largest first: power 1/2 whitens an
    update by its inputs (output energy), -1/2 a gradient (the quadratic model's value). The SVD runs in
    float32 (shares of energy need no more; float64 costs 1.6x on the CPU)."""
    scaled = matrix.float() * hessian_diag.double().pow(power).float()[None, :]
    return torch.linalg.svdvals(scaled).double().square().numpy()


def gradient_spectrum_values(gradients: dict[str, torch.Tensor], hessian_diags: dict[str, torch.Tensor]):
    return rules.gradient_spectrum_values(gradients, hessian_diags)


def gora_ranks(weights, gradients, shapes, avg_rank: int) -> dict[str, int]:
    """GoRA's importance, ranks in [avg/2, 4 avg] (as ``allocate(rule="gora")``)."""
    return rules.gora_ranks(rules.gora_importance(weights, gradients), shapes, avg_rank)


def structural_ranks(shapes, avg_rank: int) -> dict[str, int]:
    return sra_ranks(rules.structural_theta(shapes), shapes, avg_rank, 1, "params")


def pooled_ranks(theta: dict[str, float], shapes, avg_rank: int, groups: int = rules.DEPTH_GROUPS) -> dict[str, int]:
    return sra_ranks(rules.pooled_theta(theta, groups), shapes, avg_rank, 1, "params")


def spearman(a: dict[str, int], b: dict[str, int]) -> float:
    """Rank correlation of two allocations over the same matrices (nan where one is constant)."""
    from scipy import stats

    names = sorted(a)
    return float(stats.spearmanr([a[n] for n in names], [b[n] for n in names]).statistic)


def shared_parameters(a: dict[str, int], b: dict[str, int], shapes) -> float:
    """The share of the budget two allocations spend alike: ``sum min(r_a, r_b)(d_out + d_in) / sum r_a(...)``."""
    common = sum(min(a[n], b[n]) * sum(shapes[n]) for n in shapes)
    return common / sum(a[n] * sum(shapes[n]) for n in shapes)
