"""Sensitivity-LoRA: per-matrix LoRA ranks from Hessian statistics gathered before training.

The flow, one subpackage a step: ``calibration`` (``calibrate``: statistics) -> ``allocation``
(``compute_metrics`` -> ``combine`` -> ranks; ``allocate`` with an ``AllocationConfig``) -> ``integrations``
(``get_peft_model``, export, report) -> ``cli``; ``ops`` beneath them all (the statistics ops and their
dispatch). The method, with the paper's equation numbers: ``METHOD.md`` in this package.
"""

from .allocation import (
    AllocationConfig,
    ModuleMetrics,
    RankAllocation,
    allocate,
    combine,
    compute_metrics,
    pra_ranks,
    sra_ranks,
)
from .calibration import SensitivityStats, calibrate
from .errors import BackendUnavailableError, SensiloraError
from .integrations import get_peft_model, lora_config, verify_ranks
from .version import __version__

__all__ = [
    "AllocationConfig",
    "BackendUnavailableError",
    "ModuleMetrics",
    "RankAllocation",
    "SensiloraError",
    "SensitivityStats",
    "__version__",
    "allocate",
    "calibrate",
    "combine",
    "compute_metrics",
    "get_peft_model",
    "lora_config",
    "pra_ranks",
    "sra_ranks",
    "verify_ranks",
]
