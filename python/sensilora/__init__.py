"""Sensitivity-LoRA: per-matrix LoRA ranks from Hessian statistics gathered before training.

The flow, one subpackage a step: ``calibration`` (``calibrate``: statistics) -> ``allocation``
(``compute_metrics`` -> ``combine`` -> ranks; ``allocate`` with an ``AllocationConfig``) -> ``integrations``
(``get_peft_model``, export, report) -> ``cli``; ``ops`` beneath them all (the statistics ops and their
dispatch). The method, with the paper's equation numbers: ``METHOD.md`` in this package.
"""

from importlib import import_module

from .errors import BackendUnavailableError, SensiloraError
from .version import __version__

# The public names and the subpackage of each, imported on first use (PEP 562): ``import sensilora`` and
# ``sensilora --version`` stay fast (no torch), while ``sensilora.calibrate`` works as an ordinary import.
_HOMES = {
    "AllocationConfig": "allocation",
    "ModuleMetrics": "allocation",
    "RankAllocation": "allocation",
    "allocate": "allocation",
    "combine": "allocation",
    "compute_metrics": "allocation",
    "pra_ranks": "allocation",
    "sra_ranks": "allocation",
    "SensitivityStats": "calibration",
    "calibrate": "calibration",
    "mean_gradients": "calibration",
    "get_peft_model": "integrations",
    "lora_config": "integrations",
    "verify_ranks": "integrations",
}


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f"module 'sensilora' has no attribute {name!r}")
    value = getattr(import_module(f".{_HOMES[name]}", __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(__all__)


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
    "mean_gradients",
    "pra_ranks",
    "sra_ranks",
    "verify_ranks",
]
