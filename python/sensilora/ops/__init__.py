"""The statistics ops, declared with ``torch.library`` (namespace ``sensilora``).

Each op has one torch reference (``sensilora.ops.reference``) and optional accelerated
implementations registered by ``sensilora_kernels``; ``sensilora.ops.backend.resolve`` picks one per
call from the tensors' device and ``SENSILORA_BACKEND``. Declaring them as custom ops lets them
run under ``torch.compile`` and pass ``torch.library.opcheck``.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import backend, reference
from .backend import resolve

__all__ = [
    "column_sumsq_",
    "gram_",
    "inverse_diagonal",
    "topk_mean_and_effective_rank",
    "saliency_topk_mean_and_effective_rank",
    "backend",
    "reference",
]


@torch.library.custom_op("sensilora::column_sumsq_", mutates_args=("acc",))
def column_sumsq_(acc: Tensor, x: Tensor, mask: Optional[Tensor] = None) -> None:
    """``acc[j] += sum over real tokens of x[..., j]^2``. acc (d,) fp32; x (..., d) bf16/fp16/fp32; mask x.shape[:-1]."""
    resolve("column_sumsq_", x.device)[1](acc, x, mask)


@torch.library.custom_op("sensilora::gram_", mutates_args=("gram",))
def gram_(gram: Tensor, x: Tensor, mask: Optional[Tensor] = None) -> None:
    """``gram += x^T x`` over real tokens. gram (d, d) fp32; x (..., d); mask x.shape[:-1]."""
    resolve("gram_", x.device)[1](gram, x, mask)


@torch.library.custom_op("sensilora::inverse_diagonal", mutates_args=())
def inverse_diagonal(hessian: Tensor, damp: float = 0.01) -> tuple[Tensor, Tensor]:
    """Damped Cholesky ``diag(H^-1)``: hessian (d, d) or (B, d, d) -> (fp32 (..., d), damp used fp32 (B,) or ())."""
    return resolve("inverse_diagonal", hessian.device)[1](hessian, damp)


@inverse_diagonal.register_fake
def _(hessian: Tensor, damp: float = 0.01):
    return hessian.new_empty(hessian.shape[:-1], dtype=torch.float32), hessian.new_empty(
        hessian.shape[:-2], dtype=torch.float32
    )


@torch.library.custom_op("sensilora::topk_mean_and_effective_rank", mutates_args=())
def topk_mean_and_effective_rank(
    values: Tensor, offsets: Tensor, counts: Optional[Tensor] = None, k_frac: float = 0.5, alpha: float = 0.85
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-segment (total fp64, top-k mean fp64, effective rank int64); see ``reference.topk_mean_and_effective_rank``."""
    return resolve("topk_mean_and_effective_rank", values.device)[1](values, offsets, counts, k_frac, alpha)


@topk_mean_and_effective_rank.register_fake
def _(values, offsets, counts=None, k_frac=0.5, alpha=0.85):
    segments = offsets.shape[0] - 1
    return (
        values.new_empty((segments,), dtype=torch.float64),
        values.new_empty((segments,), dtype=torch.float64),
        values.new_empty((segments,), dtype=torch.int64),
    )


@torch.library.custom_op("sensilora::saliency_topk_mean_and_effective_rank", mutates_args=())
def saliency_topk_mean_and_effective_rank(
    weight: Tensor, inverse_diag: Tensor, k_frac: float = 0.5, alpha: float = 0.85
) -> tuple[Tensor, Tensor, Tensor]:
    """Selection over ``s_ij = w_ij^2 / inverse_diag_j`` of one (d_out, d_in) matrix; outputs of shape (1,)."""
    return resolve("saliency_topk_mean_and_effective_rank", weight.device)[1](weight, inverse_diag, k_frac, alpha)


@saliency_topk_mean_and_effective_rank.register_fake
def _(weight, inverse_diag, k_frac=0.5, alpha=0.85):
    return (
        weight.new_empty((1,), dtype=torch.float64),
        weight.new_empty((1,), dtype=torch.float64),
        weight.new_empty((1,), dtype=torch.int64),
    )
