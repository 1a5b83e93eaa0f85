"""Sensitivity-LoRA: per-matrix LoRA ranks from Hessian statistics gathered before training.

Pipeline: ``calibrate`` (statistics) -> ``compute_metrics`` -> ``allocate`` -> ``get_peft_model``.
"""

from .allocation import RankAllocation, allocate, combine, pra_ranks, sra_ranks
from .calibration import calibrate
from .errors import BackendUnavailableError, SensiloraError
from .lora import get_peft_model, lora_config, verify_ranks
from .metrics import ModuleMetrics, compute_metrics
from .stats import SensitivityStats

__version__ = "0.1.0"

__all__ = [
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
