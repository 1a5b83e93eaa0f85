"""sensilora_kernels: Triton (and optional CUDA) backends for ``sensilora.ops``.

Importing this package registers the backends with ``sensilora.ops.backend``; the library imports it
by itself the first time a CUDA tensor (or ``SENSILORA_BACKEND``) asks, so installing it is enough.
Triton runs on CUDA tensors, or on CPU tensors under ``TRITON_INTERPRET=1`` (tests).
"""

from __future__ import annotations

import os

import torch

from sensilora.ops.backend import Backend, register_backend

from . import column_sumsq, gram, inverse_diagonal, selection


def _triton_supports(device: torch.device) -> bool:
    return device.type == "cuda" or (device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1")


TRITON_OPS = {
    "column_sumsq_": column_sumsq.column_sumsq_,
    "gram_": gram.gram_,
    "inverse_diagonal": inverse_diagonal.inverse_diagonal,
    "topk_mean_and_effective_rank": selection.topk_mean_and_effective_rank,
    "saliency_topk_mean_and_effective_rank": selection.saliency_topk_mean_and_effective_rank,
}

register_backend(Backend("triton", TRITON_OPS, _triton_supports, "Triton kernels"))

from . import cuda  # noqa: E402  (registers the "cuda" backend when the extension was built)

__all__ = ["column_sumsq", "gram", "inverse_diagonal", "selection", "cuda", "TRITON_OPS"]
