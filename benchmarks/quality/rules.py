"""Allocation rules the screen (``screen.py``) scores beside the library's variants, at uniform LoRA's
trainable-parameter budget ``avg_rank * sum(d_out + d_in)``. Each returns ``{module name: rank}``.

- ``greedy_ranks``: every matrix starts at rank 1; then rank units (the k-th singular direction of a
  matrix, worth ``value_k``) are taken by value per parameter, ``value_k / (d_out + d_in)``, best first,
  while the budget allows. On the teacher's own spectra this is the screen's oracle; on the whitened
  gradient at the base weights it is a rule a user can run.
- ``gradient_spectrum_values``: the whitened gradient spectrum. For a loss with gradient ``G`` (d_out, d_in)
  and curvature ``diag(h)`` over the inputs, the best rank-k step ``Delta W`` lowers the quadratic model
  ``<G, Delta W> + 1/2 ||Delta W diag(h)^1/2||^2`` by ``1/2 sum_{i<=k} sigma_i(G diag(h)^-1/2)^2``: a rank
  unit is worth ``sigma_k^2`` (diminishing returns, which proportional SRA lacks).
- ``gora_ranks``: GoRA's importance (He et al. 2025, "GoRA: Gradient-driven Adaptive Low Rank Adaptation",
  ``mean |W * G|`` with the calibration-averaged gradient), ranks proportional to it in [avg/2, 4 avg].
- ``structural_ranks``: no data; rank proportional to depth + 1 (every module type alike), the baseline a
  data-driven rule must beat (allocations measured on these models rise with depth).
- ``pooled_ranks``: a rule's theta averaged within (module type, depth third) groups, then SRA: one rank
  per group, so per-matrix noise in the statistic cannot move rank.
"""

from __future__ import annotations

import heapq

import numpy as np
import torch
from sensilora.allocation.budgets import largest_rank, sra_ranks
from sensilora.calibration.targets import layer_and_kind


def depth_and_type(name: str) -> tuple[int, str]:
    """``model.layers.11.mlp.down_proj`` -> (11, ``mlp.down_proj``); a name without a layer index: (0, name)."""
    layer, kind = layer_and_kind(name)
    return layer or 0, kind


def parameter_budget(shapes: dict[str, tuple[int, int]], avg_rank: int) -> int:
    return avg_rank * sum(d_out + d_in for d_out, d_in in shapes.values())


def greedy_ranks(values: dict[str, np.ndarray], shapes: dict[str, tuple[int, int]], avg_rank: int) -> dict[str, int]:
    """values[name]: (k,) non-increasing worth of the matrix's rank units 1..k. Ranks start at 1; the
    other units go by worth per parameter under the budget (a unit that does not fit is passed over)."""
    cost = {n: d_out + d_in for n, (d_out, d_in) in shapes.items()}
    ranks = dict.fromkeys(shapes, 1)
    left = parameter_budget(shapes, avg_rank) - sum(cost.values())
    ceiling = {n: min(largest_rank(*shapes[n]), len(values[n])) for n in shapes}
    heap = [(-float(values[n][1]) / cost[n], n) for n in sorted(shapes) if ceiling[n] > 1]
    heapq.heapify(heap)
    while heap and left > 0:
        _, name = heapq.heappop(heap)
        if cost[name] > left:
            continue
        ranks[name] += 1
        left -= cost[name]
        if ranks[name] < ceiling[name]:
            heapq.heappush(heap, (-float(values[name][ranks[name]]) / cost[name], name))
    return ranks


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


def damped(hessian_diag: torch.Tensor, damp: float = 0.01) -> torch.Tensor:
    """``h + damp * mean(h)``: no direction is free where an input column never fires."""
    return hessian_diag + damp * hessian_diag.mean()


def gradient_spectrum_values(gradients: dict[str, torch.Tensor], hessian_diags: dict[str, torch.Tensor]):
    return {n: whitened_spectrum(g, damped(hessian_diags[n]), -0.5) for n, g in gradients.items()}


def gora_ranks(weights, gradients, shapes, avg_rank: int) -> dict[str, int]:
    importance = {n: float((weights[n].float() * gradients[n]).abs().mean()) for n in shapes}
    return sra_ranks(importance, shapes, avg_rank, max(1, avg_rank // 2), "params", 4 * avg_rank)


def structural_ranks(shapes, avg_rank: int) -> dict[str, int]:
    return sra_ranks({n: depth_and_type(n)[0] + 1.0 for n in shapes}, shapes, avg_rank, 1, "params")


def pooled_ranks(theta: dict[str, float], shapes, avg_rank: int, groups: int = 3) -> dict[str, int]:
    depth = {n: depth_and_type(n)[0] for n in shapes}
    layers = max(depth.values()) + 1
    group = {n: (depth_and_type(n)[1], depth[n] * groups // layers) for n in shapes}
    mean = {g: float(np.mean([theta[n] for n in shapes if group[n] == g])) for g in set(group.values())}
    return sra_ranks({n: mean[group[n]] for n in shapes}, shapes, avg_rank, 1, "params")


def spearman(a: dict[str, int], b: dict[str, int]) -> float:
    """Rank correlation of two allocations over the same matrices (nan where one is constant)."""
    from scipy import stats

    names = sorted(a)
    return float(stats.spearmanr([a[n] for n in names], [b[n] for n in names]).statistic)


def shared_parameters(a: dict[str, int], b: dict[str, int], shapes) -> float:
    """The share of the budget two allocations spend alike: ``sum min(r_a, r_b)(d_out + d_in) / sum r_a(...)``."""
    common = sum(min(a[n], b[n]) * sum(shapes[n]) for n in shapes)
    return common / sum(a[n] * sum(shapes[n]) for n in shapes)
