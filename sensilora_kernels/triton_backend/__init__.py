"""The Triton backend: one module per op (``_kernel`` -> launcher -> the op's entry), and ``KERNELS``, its
kernels by op name (imported only where Triton is installed)."""

from __future__ import annotations

from . import column_sumsq, gram, inverse_diagonal, selection

KERNELS = {
    "column_sumsq_": column_sumsq.column_sumsq_,
    "gram_": gram.gram_,
    "inverse_diagonal": inverse_diagonal.inverse_diagonal,
    "topk_mean_and_effective_rank": selection.topk_mean_and_effective_rank,
    "saliency_topk_mean_and_effective_rank": selection.saliency_topk_mean_and_effective_rank,
}
