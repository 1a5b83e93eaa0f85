"""The statistics ops, declared once with ``torch.library`` (namespace ``sensilora``).

``OPS`` (in ``declarations``) is the only list of them: name, schema, torch reference, fake (meta) function. Each op
is defined in torch's dispatcher with its reference registered for every device
(``CompositeExplicitAutograd``); device kernels are registered on top for their dispatch key by a
backend plugin (``sensilora_kernels`` registers Triton/CUDA kernels for the CUDA key), so a CUDA tensor
reaches its kernel through the dispatcher with no Python routing per call. ``load_backends`` finds the
plugins through the ``sensilora.backends`` entry point group, once; ``backend_report`` says which kernel
serves each op on each device and why (``sensilora env`` prints it).
"""

from __future__ import annotations

from . import reference
from .declarations import (
    OP_NAMES,
    OPS,
    OpSpec,
    column_sumsq_,
    gram_,
    inverse_diagonal,
    saliency_topk_mean_and_effective_rank,
    topk_mean_and_effective_rank,
)
from .plugins import backend_report, forced_backend, load_backends, plugin_status

__all__ = [
    "OPS",
    "OP_NAMES",
    "OpSpec",
    "backend_report",
    "column_sumsq_",
    "forced_backend",
    "gram_",
    "inverse_diagonal",
    "load_backends",
    "plugin_status",
    "reference",
    "saliency_topk_mean_and_effective_rank",
    "topk_mean_and_effective_rank",
]
