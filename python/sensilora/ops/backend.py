"""Backend registry: which implementation of each op runs for a given device.

The torch reference (``sensilora.ops.reference``) is always there and serves CPU tensors.
Accelerated backends (``sensilora_kernels``: ``"triton"`` and, when its CUDA extension is built,
``"cuda"``) register themselves on import; this module imports ``sensilora_kernels`` lazily, the
first time a non-CPU tensor (or a forced backend) asks for one, so installing it is enough.

``SENSILORA_BACKEND=torch|triton|cuda`` forces one backend for every op: a forced backend that cannot
load or lacks the op raises ``BackendUnavailableError``; the automatic choice falls back quietly.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..errors import BackendUnavailableError
from . import reference

OPS = (
    "column_sumsq_",
    "gram_",
    "inverse_diagonal",
    "topk_mean_and_effective_rank",
    "saliency_topk_mean_and_effective_rank",
)
BACKENDS = ("torch", "triton", "cuda")

# Automatic choice on CUDA tensors, fastest first. This order is a default until GPU benchmarks
# (benchmarks/run_all.py) say otherwise: no GPU was available when it was written.
AUTO_ORDER: dict[str, tuple[str, ...]] = {op: ("cuda", "triton") for op in OPS}


@dataclass
class Backend:
    name: str
    ops: dict[str, Callable]
    supports_device: Callable[[torch.device], bool]
    notes: str = ""


@dataclass
class _Registry:
    backends: dict[str, Backend] = field(default_factory=dict)
    plugin_loaded: bool = False
    plugin_error: BaseException | None = None


_REGISTRY = _Registry()
_REGISTRY.backends["torch"] = Backend(
    "torch", {op: getattr(reference, op) for op in OPS}, lambda device: True, "pure PyTorch reference"
)


def register_backend(backend: Backend) -> None:
    """Register (or replace) an accelerated backend; called by ``sensilora_kernels`` on import."""
    if backend.name not in BACKENDS or backend.name == "torch":
        raise ValueError(f"sensilora.ops.backend: unknown backend name {backend.name!r}; use triton or cuda")
    unknown = set(backend.ops) - set(OPS)
    if unknown:
        raise ValueError(f"sensilora.ops.backend: backend {backend.name!r} registers unknown ops {sorted(unknown)}")
    _REGISTRY.backends[backend.name] = backend


def _load_plugins() -> None:
    if _REGISTRY.plugin_loaded:
        return
    _REGISTRY.plugin_loaded = True
    try:
        importlib.import_module("sensilora_kernels")
    except Exception as error:  # an optional backend must never break the library
        _REGISTRY.plugin_error = error


def forced_backend() -> str | None:
    value = os.environ.get("SENSILORA_BACKEND", "").strip().lower()
    if not value or value == "auto":
        return None
    if value not in BACKENDS:
        raise BackendUnavailableError(
            f"SENSILORA_BACKEND={value!r} is not a backend; use one of {', '.join(BACKENDS)} or unset it"
        )
    return value


def resolve(op: str, device: torch.device) -> tuple[str, Callable]:
    """Return ``(backend_name, implementation)`` for ``op`` on tensors living on ``device``."""
    forced = forced_backend()
    if forced == "torch" or (forced is None and device.type == "cpu"):
        return "torch", _REGISTRY.backends["torch"].ops[op]
    _load_plugins()
    if forced is not None:
        backend = _REGISTRY.backends.get(forced)
        if backend is None:
            cause = f" (import sensilora_kernels failed: {_REGISTRY.plugin_error!r})" if _REGISTRY.plugin_error else ""
            raise BackendUnavailableError(
                f"SENSILORA_BACKEND={forced} but that backend is not available{cause}; install "
                "sensilora_kernels with its requirements (triton; a CUDA build for 'cuda') or unset SENSILORA_BACKEND"
            )
        if op not in backend.ops or not backend.supports_device(device):
            raise BackendUnavailableError(
                f"SENSILORA_BACKEND={forced} cannot run {op} on {device} tensors "
                f"(set TRITON_INTERPRET=1 to run Triton on the CPU) or unset SENSILORA_BACKEND"
            )
        return forced, backend.ops[op]
    for name in AUTO_ORDER[op]:
        backend = _REGISTRY.backends.get(name)
        if backend is not None and op in backend.ops and backend.supports_device(device):
            return name, backend.ops[op]
    return "torch", _REGISTRY.backends["torch"].ops[op]


def available_backends() -> dict[str, str]:
    """Names of the registered backends with a one-line description each."""
    _load_plugins()
    return {name: backend.notes for name, backend in _REGISTRY.backends.items()}
