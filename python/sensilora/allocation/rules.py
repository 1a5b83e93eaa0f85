"""Allocation rules beside the paper's theta (METHOD.md section 4b), chosen by ``AllocationConfig.rule`` and
``AllocationConfig.pooling``. Every rule spends uniform LoRA's trainable parameters at ``avg_rank``.

- ``structural``: no data; theta proportional to depth + 1 for every module type, the baseline a
  data-driven rule must beat.
- ``gora``: GoRA's importance (He et al. 2025, "GoRA: Gradient-driven Adaptive Low Rank Adaptation"):
  ``mean |W * G|`` with ``G`` the loss gradient of the weight averaged over the calibration batches;
  ranks proportional to it, clipped to ``[avg_rank / 2, 4 avg_rank]`` as GoRA does.
- ``gradient-spectrum``: for a loss with gradient ``G`` (d_out, d_in) and curvature ``diag(h)`` over the
  inputs (the calibration Hessian diagonal, damped), the best rank-k step lowers the quadratic model
  ``<G, dW> + 1/2 ||dW diag(h)^1/2||^2`` by ``1/2 sum_{i<=k} sigma_i(G diag(h)^-1/2)^2``: the k-th rank
  unit of a matrix is worth ``sigma_k^2``. Every matrix starts at rank 1; the other units go greedily by
  worth per parameter ``sigma_k^2 / (d_out + d_in)`` while the budget allows (diminishing returns, which
  proportional SRA lacks).
- pooling ``type-depth``: theta averaged within (module type, depth third) groups before SRA, so noise in
  one matrix's statistic cannot move its rank alone.
"""

from __future__ import annotations

import heapq

import numpy as np
import torch

from ..calibration.targets import layer_and_kind
from ..errors import SensiloraError
from .budgets import sra_ranks

DEPTH_GROUPS = 3  # pooling: the depth thirds
GRADIENT_DAMP = 0.01  # gradient-spectrum: h + GRADIENT_DAMP * mean(h), so a column that never fires is not free


def depth_and_type(name: str) -> tuple[int, str]:
    """``model.layers.11.mlp.down_proj`` -> (11, ``mlp.down_proj``); a name without a layer index: (0, name)."""
    layer, kind = layer_and_kind(name)
    return layer or 0, kind


def structural_theta(shapes: dict[str, tuple[int, int]]) -> dict[str, float]:
    """The data-free prior: depth + 1 for every matrix (deeper layers more rank, every type alike)."""
    return {name: depth_and_type(name)[0] + 1.0 for name in shapes}


def pooled_theta(theta: dict[str, float], groups: int = DEPTH_GROUPS) -> dict[str, float]:
    """``theta`` averaged within (module type, depth group) groups: layers split into ``groups`` equal spans."""
    depth = {name: depth_and_type(name)[0] for name in theta}
    layers = max(depth.values()) + 1
    group = {name: (depth_and_type(name)[1], depth[name] * groups // layers) for name in theta}
    mean = {g: float(np.mean([theta[n] for n in theta if group[n] == g])) for g in set(group.values())}
    return {name: mean[group[name]] for name in theta}


def gora_importance(weights: dict[str, torch.Tensor], gradients: dict[str, torch.Tensor]) -> dict[str, float]:
    """GoRA's ``mean |W * G|`` per matrix; weights and gradients (d_out, d_in), computed in fp32."""
    return {name: float((weights[name].float() * gradients[name].float()).abs().mean()) for name in gradients}


def gora_ranks(
    importance: dict[str, float],
    shapes: dict[str, tuple[int, int]],
    avg_rank: int,
    min_rank: int = 1,
    max_rank: int | None = None,
) -> dict[str, int]:
    """SRA on GoRA's importance at uniform LoRA's parameters, ranks clipped to GoRA's ``[avg/2, 4 avg]``
    within ``[min_rank, max_rank]``."""
    low = max(min_rank, avg_rank // 2, 1)
    high = 4 * avg_rank if max_rank is None else min(max_rank, 4 * avg_rank)
    return sra_ranks(importance, shapes, avg_rank, low, "params", high)


def gradient_spectrum_values(
    gradients: dict[str, torch.Tensor], hessian_diags: dict[str, torch.Tensor], damp: float = GRADIENT_DAMP
) -> dict[str, np.ndarray]:
    """Per matrix the (min(d_out, d_in),) float64 squared singular values of ``G diag(h + damp mean(h))^-1/2``,
    largest first (the SVD in fp32: shares of energy need no more)."""
    values = {}
    for name, gradient in gradients.items():
        h = hessian_diags[name].double()
        scale = (h + damp * h.mean()).rsqrt().float()
        values[name] = torch.linalg.svdvals(gradient.float() * scale[None, :]).double().square().cpu().numpy()
    return values


def greedy_ranks(
    values: dict[str, np.ndarray], shapes: dict[str, tuple[int, int]], budget: int, ceilings: dict[str, int]
) -> dict[str, int]:
    """values[name]: (k,) non-increasing worth of the matrix's rank units 1..k. Ranks start at 1; the other
    units go by worth per parameter ``value / (d_out + d_in)``, best first, while ``budget`` (trainable
    parameters) allows; a unit that does not fit is passed over; no rank exceeds ``ceilings[name]``."""
    cost = {name: d_out + d_in for name, (d_out, d_in) in shapes.items()}
    ranks = dict.fromkeys(shapes, 1)
    left = budget - sum(cost.values())
    if left < 0:
        raise SensiloraError(f"the budget of {budget} parameters cannot give every matrix rank 1; raise avg_rank")
    ceiling = {name: min(ceilings[name], len(values[name])) for name in shapes}
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
