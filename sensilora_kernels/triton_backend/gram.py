"""``gram += x^T x`` over real tokens: lower-triangle tiles only, mirrored on store, fp32 accumulation."""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from .._layout import optional_pointer, token_arguments, token_partition, token_rows
from ..views import token_view


@triton.jit
def _gram_kernel(
    gram_ptr,
    x_ptr,
    mask_ptr,
    tile_rows_ptr,
    tile_cols_ptr,
    n_tokens,
    seq_len,
    d,
    tokens_per_program,
    stride_b,
    stride_t,
    stride_d,
    mask_stride_b,
    mask_stride_t,
    HAS_MASK: tl.constexpr,
    IEEE: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    tile_i = tl.load(tile_rows_ptr + tl.program_id(0))
    tile_j = tl.load(tile_cols_ptr + tl.program_id(0))
    cols_i = tile_i * BLOCK_D + tl.arange(0, BLOCK_D)
    cols_j = tile_j * BLOCK_D + tl.arange(0, BLOCK_D)
    start = tl.program_id(1) * tokens_per_program
    end = tl.minimum(start + tokens_per_program, n_tokens)
    acc = tl.zeros([BLOCK_D, BLOCK_D], dtype=tl.float32)
    for first in range(start, end, BLOCK_T):
        b, t, row_ok = token_rows(first, end, seq_len, mask_ptr, mask_stride_b, mask_stride_t, HAS_MASK, BLOCK_T)
        base = x_ptr + b[:, None] * stride_b + t[:, None] * stride_t
        x_i = tl.load(
            base + cols_i[None, :].to(tl.int64) * stride_d, mask=row_ok[:, None] & (cols_i[None, :] < d), other=0.0
        )
        x_j = tl.load(
            base + cols_j[None, :].to(tl.int64) * stride_d, mask=row_ok[:, None] & (cols_j[None, :] < d), other=0.0
        )
        if IEEE:
            acc += tl.dot(tl.trans(x_i.to(tl.float32)), x_j.to(tl.float32), input_precision="ieee")
        else:
            acc += tl.dot(tl.trans(x_i), x_j)
    ok = (cols_i[:, None] < d) & (cols_j[None, :] < d)
    # relaxed atomics: nothing reads the gram before the kernel ends (acq_rel would fence every one)
    tl.atomic_add(_row_pointers(gram_ptr, cols_i[:, None], d) + cols_j[None, :], acc, mask=ok, sem="relaxed")
    if tile_i != tile_j:  # mirror the off-diagonal tile into the upper triangle
        tl.atomic_add(_row_pointers(gram_ptr, cols_j[None, :], d) + cols_i[:, None], acc, mask=ok, sem="relaxed")


@triton.jit
def _row_pointers(gram_ptr, rows, d):
    """Pointers to the starts of ``rows`` of a (d, d) matrix, offsets in int64: d * d passes 2^31 from
    d = 46,341 columns."""
    return gram_ptr + rows.to(tl.int64) * d


@functools.lru_cache(maxsize=64)
def _lower_tiles(tiles: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    rows, cols = torch.tril_indices(tiles, tiles)
    return rows.to(torch.int32).to(device), cols.to(torch.int32).to(device)


def _ieee(x: torch.Tensor) -> bool:
    """fp32 inputs use exact fp32 products (no TF32). Triton's interpreter mis-emulates bf16 ``tl.dot``,
    so under it half inputs are upcast too; on a GPU they go to the tensor cores as they are."""
    return x.dtype == torch.float32 or os.environ.get("TRITON_INTERPRET") == "1"


def launch_config(d: int, ieee: bool, unit_column_stride: bool) -> dict[str, int]:
    """Tile sizes and launch options. Wide layers whose columns are contiguous (Triton then specialises
    the column stride to 1 and vectorises the loads) take 128 x 128 output tiles, 8 warps, 3 stages
    (the shape of Triton's Hopper GEMM configurations), over 64 tokens a step for half inputs and 32 for
    exact fp32 products (FMA, more registers). Others take 64 x 64 tiles over 32 tokens: with a runtime
    column stride every element carries its own 64-bit address and larger tiles spill on sm_90. Chosen
    without a GPU to tune on; the compile test checks that neither spills registers."""
    if d >= 128 and unit_column_stride:
        return {"BLOCK_D": 128, "BLOCK_T": 32 if ieee else 64, "num_warps": 8, "num_stages": 3}
    # exact fp32 products over a runtime stride spilled at 4 warps under Triton 3.6 (255 registers + 16 bytes
    # of stack): 8 warps halve each thread's share of the 64 x 64 accumulator
    warps = 8 if ieee else 4
    return {"BLOCK_D": min(64, max(16, triton.next_power_of_2(d))), "BLOCK_T": 32, "num_warps": warps, "num_stages": 3}


def gram_(gram: torch.Tensor, x: torch.Tensor, mask: torch.Tensor | None = None) -> None:
    """gram (d, d) fp32 contiguous, in place; x (..., d) bf16/fp16/fp32 (fp32 in IEEE precision, no TF32)."""
    x3, mask3 = token_view(x, mask)
    n_tokens, d = x3.shape[0] * x3.shape[1], x3.shape[2]
    if n_tokens == 0:
        return
    if not gram.is_contiguous():
        raise ValueError("sensilora_kernels.gram_: the accumulator must be contiguous")
    ieee = _ieee(x)
    config = launch_config(d, ieee, x3.stride(2) == 1)
    block_d, block_t = config["BLOCK_D"], config["BLOCK_T"]
    tiles = triton.cdiv(d, block_d)
    tile_rows, tile_cols = _lower_tiles(tiles, x.device)
    per_program, splits = token_partition(x.device, tile_rows.numel(), n_tokens, block_t, 8)
    _gram_kernel[(tile_rows.numel(), splits)](
        gram,
        x3,
        optional_pointer(x3, mask3),
        tile_rows,
        tile_cols,
        *token_arguments(x3, mask3, per_program),
        HAS_MASK=mask3 is not None,
        IEEE=ieee,
        **config,
    )
