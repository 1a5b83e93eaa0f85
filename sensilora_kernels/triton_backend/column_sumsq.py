"""``acc[j] += sum over real tokens of w * x[..., j]^2``: one pass over x, fp32 accumulation, no fp32 copy; the
optional per-token weight ``w`` (the loss-aware statistic's squared output-gradient norms) fused in."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._layout import optional_pointer, token_arguments, token_partition, token_rows
from ..views import optional_strides, row_weight_view, token_view


@triton.jit
def _column_sumsq_kernel(
    acc_ptr,
    x_ptr,
    mask_ptr,
    weight_ptr,
    n_tokens,
    seq_len,
    d,
    tokens_per_program,
    stride_b,
    stride_t,
    stride_d,
    mask_stride_b,
    mask_stride_t,
    weight_stride_b,
    weight_stride_t,
    HAS_MASK: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    cols = tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D)
    col_ok = cols < d
    start = tl.program_id(1) * tokens_per_program
    end = tl.minimum(start + tokens_per_program, n_tokens)
    partial = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)
    for first in range(start, end, BLOCK_T):
        b, t, row_ok = token_rows(first, end, seq_len, mask_ptr, mask_stride_b, mask_stride_t, HAS_MASK, BLOCK_T)
        values = tl.load(
            x_ptr + b[:, None] * stride_b + t[:, None] * stride_t + cols[None, :].to(tl.int64) * stride_d,
            mask=row_ok[:, None] & col_ok[None, :],
            other=0.0,
        ).to(tl.float32)
        if HAS_WEIGHT:
            weight = tl.load(weight_ptr + b * weight_stride_b + t * weight_stride_t, mask=row_ok, other=0.0)
            partial += values * values * weight[:, None]
        else:
            partial += values * values
    tl.atomic_add(acc_ptr + cols, tl.sum(partial, axis=0), mask=col_ok, sem="relaxed")  # read after the kernel


def column_sumsq_(
    acc: torch.Tensor, x: torch.Tensor, mask: torch.Tensor | None = None, row_weight: torch.Tensor | None = None
) -> None:
    """acc (d,) fp32 in place; x (..., d) bf16/fp16/fp32 with any strides; mask and row_weight (fp32)
    x.shape[:-1] or None."""
    x3, mask3 = token_view(x, mask)
    weight3 = row_weight_view(x3, row_weight)
    n_tokens, d = x3.shape[0] * x3.shape[1], x3.shape[2]
    if n_tokens == 0:
        return
    block_d = min(128, triton.next_power_of_2(d))
    block_t = 32
    column_blocks = triton.cdiv(d, block_d)
    per_program, splits = token_partition(x.device, column_blocks, n_tokens, block_t, 4)
    _column_sumsq_kernel[(column_blocks, splits)](
        acc,
        x3,
        optional_pointer(x3, mask3),
        optional_pointer(x3, weight3),
        *token_arguments(x3, mask3, per_program),
        *optional_strides(weight3),
        HAS_MASK=mask3 is not None,
        HAS_WEIGHT=weight3 is not None,
        BLOCK_T=block_t,
        BLOCK_D=block_d,
    )
