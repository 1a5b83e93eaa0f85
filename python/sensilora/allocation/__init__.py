"""Allocation: statistics -> metrics (``metrics``, METHOD.md section 2) -> theta (``combination``, section 3)
-> integer ranks (``budgets``, section 4) under an ``AllocationConfig`` (``config``), composed by
``allocate`` (``allocator``) into a ``RankAllocation`` (``result``)."""

from .allocator import allocate
from .budgets import assign_ranks, check_budget_fits, pra_ranks, sra_ranks
from .combination import combine, normalised_ranks, per_metric_ranks
from .config import AllocationConfig
from .metrics import METRIC_LABELS, ModuleMetrics, compute_metrics
from .result import RankAllocation

__all__ = [
    "METRIC_LABELS",
    "AllocationConfig",
    "ModuleMetrics",
    "RankAllocation",
    "allocate",
    "assign_ranks",
    "check_budget_fits",
    "combine",
    "compute_metrics",
    "normalised_ranks",
    "per_metric_ranks",
    "pra_ranks",
    "sra_ranks",
]
