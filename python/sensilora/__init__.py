"""Sensitivity-LoRA: per-matrix LoRA ranks from Hessian statistics gathered before training.

Pipeline: ``calibrate`` (statistics) -> ``compute_metrics`` -> ``allocate`` (``AllocationConfig``) ->
``get_peft_model``. The method, with the paper's equation numbers: ``METHOD.md`` in this package.
"""

from .allocation import combine, pra_ranks, sra_ranks
from .calibration import calibrate
from .config import AllocationConfig
from .errors import BackendUnavailableError, SensiloraError
from .lora import get_peft_model, lora_config, verify_ranks
from .metrics import ModuleMetrics, compute_metrics
from .pipeline import allocate
from .result import RankAllocation
from .stats import SensitivityStats

__version__ = "0.1.0"

__all__ = [
    "AllocationConfig",
    "BackendUnavailableError",
    "ModuleMetrics",
    "RankAllocation",
    "SensiloraError",
    "SensitivityStats",
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
