"""Shared Triton launch helpers: program counts per device, the token-streaming kernels' arguments."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .views import optional_strides


def token_splits(device: torch.device, column_blocks: int, tokens: int, min_tokens_per_split: int) -> int:
    """How many programs share the token axis: enough to fill a GPU, one under the CPU interpreter."""
    if device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    wanted = max(1, (4 * sms) // max(column_blocks, 1))
    return max(1, min(wanted, tokens // min_tokens_per_split or 1))


def token_partition(
    device: torch.device, programs_per_split: int, n_tokens: int, block_t: int, min_blocks: int
) -> tuple[int, int]:
    """(tokens per program, number of token splits), each program's share a multiple of ``block_t``."""
    splits = token_splits(device, programs_per_split, n_tokens, block_t * min_blocks)
    per_program = triton.cdiv(triton.cdiv(n_tokens, splits), block_t) * block_t
    return per_program, triton.cdiv(n_tokens, per_program)


def optional_pointer(x3: torch.Tensor, per_token: torch.Tensor | None) -> torch.Tensor:
    """A kernel's optional (B, T) pointer argument, the mask or the row weights (x3 stands in when there is
    none; HAS_MASK / HAS_WEIGHT says which)."""
    return x3 if per_token is None else per_token


def token_arguments(x3: torch.Tensor, mask3: torch.Tensor | None, tokens_per_program: int) -> tuple[int, ...]:
    """The scalar arguments every token-streaming kernel takes, in order: n_tokens, seq_len, d,
    tokens_per_program, x3's three strides, the mask's two strides (0 without a mask)."""
    batch, seq_len, d = x3.shape
    return (batch * seq_len, seq_len, d, tokens_per_program, *x3.stride(), *optional_strides(mask3))


@triton.jit
def token_rows(
    first, end, seq_len, mask_ptr, mask_stride_b, mask_stride_t, HAS_MASK: tl.constexpr, BLOCK_T: tl.constexpr
):
    """Batch and position indices (int64) of BLOCK_T token rows from ``first``, and which are real."""
    rows = first + tl.arange(0, BLOCK_T)
    row_ok = rows < end
    b = (rows // seq_len).to(tl.int64)
    t = (rows % seq_len).to(tl.int64)
    if HAS_MASK:
        keep = tl.load(mask_ptr + b * mask_stride_b + t * mask_stride_t, mask=row_ok, other=0)
        row_ok = row_ok & (keep != 0)
    return b, t, row_ok
