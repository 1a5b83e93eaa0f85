"""Per-matrix sensitivity metrics (METHOD.md section 2): trace (eq. 8), top-k mean (eq. 9), effective rank (eq. 10)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from .. import ops
from ..calibration.stats import SensitivityStats
from ..calibration.targets import linear_shape, linear_weight, weights_loaded
from ..errors import SensiloraError
from .config import check_fractions

# The three metrics by field name, with the label every table and plot gives them.
METRIC_LABELS = {
    "global_sensitivity": "S_global (trace, eq. 8)",
    "topk": "S_topk (eq. 9)",
    "effective_rank": "S_eff (eq. 10)",
}


@dataclass(frozen=True)
class ModuleMetrics:
    """global_sensitivity = sum of the m sensitivities (eq. 8), topk = mean of the k largest with
    k = ceil(k_frac*m) (eq. 9), effective_rank = fewest largest values holding alpha of the sum (eq. 10)."""

    global_sensitivity: float
    topk: float
    effective_rank: int

    def as_dict(self) -> dict:
        return asdict(self)


def _diag_metrics(stats: SensitivityStats, k_frac: float, alpha: float) -> dict[str, ModuleMetrics]:
    names = stats.module_names
    diagonals = [stats.hessian_diag(name) for name in names]
    device = diagonals[0].device
    values = torch.cat([d.float().to(device) for d in diagonals])
    counts = torch.cat(
        [
            torch.full((d.numel(),), stats.module_shapes[name][0], dtype=torch.long, device=device)
            for name, d in zip(names, diagonals)
        ]
    )
    lengths = torch.tensor([0] + [d.numel() for d in diagonals], device=device)
    totals, topk, ranks = ops.topk_mean_and_effective_rank(values, torch.cumsum(lengths, 0), counts, k_frac, alpha)
    return {
        name: ModuleMetrics(float(t), float(k), int(r))
        for name, t, k, r in zip(names, totals.tolist(), topk.tolist(), ranks.tolist())
    }


def _obs_metrics(stats: SensitivityStats, model: nn.Module, k_frac: float, alpha: float, progress: bool):
    modules = dict(model.named_modules())
    result = {}
    for name in tqdm(stats.module_names, desc="obs saliency metrics", disable=not progress):
        module = modules.get(name)
        if module is None or linear_shape(module) != tuple(stats.module_shapes[name]):
            raise SensiloraError(
                f"model has no module {name!r} of shape {stats.module_shapes[name]} (d_out, d_in); "
                "pass the calibrated model"
            )
        with weights_loaded(module):  # accelerate-offloaded weights: loaded for this module only
            weight = linear_weight(module).detach()
            if not torch.is_floating_point(weight) or tuple(weight.shape) != tuple(stats.module_shapes[name]):
                raise SensiloraError(
                    f"module {name!r} stores its weight quantised ({weight.dtype}, shape {tuple(weight.shape)}): "
                    "obs mode needs the dense weights; use mode='diag' (it needs only activations) or load the model "
                    "unquantised"
                )
            inverse = stats.inverse_hessian_diag(name).to(weight.device)
            total, topk, rank = ops.saliency_topk_mean_and_effective_rank(weight, inverse, k_frac, alpha)
        result[name] = ModuleMetrics(float(total[0]), float(topk[0]), int(rank[0]))
    return result


def compute_metrics(
    stats: SensitivityStats,
    k_frac: float = 0.5,
    alpha: float = 0.85,
    model: nn.Module | None = None,
    progress: bool = False,
) -> dict[str, ModuleMetrics]:
    """Metrics for every calibrated module, in ``stats.module_names`` order.

    diag mode: the sensitivities are each ``h_j`` with multiplicity d_out (never repeated in memory).
    obs mode: the d_out*d_in saliencies ``w_ij^2 / [H^-1]_jj``, which need the model's weights.
    """
    check_fractions(k_frac, alpha)
    ops.load_backends()
    if stats.mode == "diag":
        return _diag_metrics(stats, k_frac, alpha)
    if model is None:
        raise SensiloraError(
            "obs-mode metrics need the weights: pass model=<the calibrated model> to compute_metrics/allocate"
        )
    return _obs_metrics(stats, model, k_frac, alpha, progress)
