"""``allocate``: statistics -> metrics (eqs. 8-10) -> theta (eqs. 11-14) -> ranks (eq. 15 or PRA)."""

from __future__ import annotations

from torch import nn

from ..calibration.stats import SensitivityStats
from ..errors import SensiloraError
from .budgets import assign_ranks
from .combination import combine
from .config import AllocationConfig
from .metrics import compute_metrics
from .result import RankAllocation


def allocate(
    stats: SensitivityStats,
    config: AllocationConfig | None = None,
    *,
    model: nn.Module | None = None,
    progress: bool = False,
    **overrides,
) -> RankAllocation:
    """Sensitivity-LoRA ranks from calibration statistics.

    config: an ``AllocationConfig`` (default: the paper's SRA at avg_rank 8); ``overrides`` replace
    fields of it, e.g. ``allocate(stats, avg_rank=4, max_rank=16)``. ``model`` (the calibrated model)
    is needed in obs mode only, for the weights in the saliencies. progress: a bar over the obs metrics.
    """
    if config is not None and not isinstance(config, AllocationConfig):
        raise SensiloraError(
            f"allocate's second argument is an AllocationConfig, got {type(config).__name__}; pass avg_rank=... by name"
        )
    config = (config or AllocationConfig()).replace(**overrides)
    module_metrics = compute_metrics(stats, config.k_frac, config.alpha, model=model, progress=progress)
    theta = combine(module_metrics, config.metrics, config.weighting, config.aggregation, config.temperature)
    shapes = {n: tuple(stats.module_shapes[n]) for n in theta}
    ranks = assign_ranks(theta, shapes, config)
    return RankAllocation(ranks, theta, module_metrics, shapes, config, stats.mode, dict(stats.info), stats.model_name)
