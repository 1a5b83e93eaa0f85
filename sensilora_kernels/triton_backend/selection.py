"""The Triton radix histogram pass (flat values, or fused obs saliencies) and the two selection ops
built on it with the torch-only driver in ``radix_select``."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..radix_select import make_saliency_selection, make_selection

BLOCK = 4096  # elements a program histograms
RADIX_BITS = 4  # 16 buckets a pass, 8 passes: a chunk's one-hot tile is (CHUNK, 16), not (CHUNK, 256)
CHUNK = 128  # elements a program adds to its histograms at a time: a (128, 16) tile, 16 entries a thread


@triton.jit
def _bucket_totals(in_bucket, match, counts, weighted):
    """Per-bucket count (int64) and fp64 sum of one chunk's matching elements: (CHUNK, B) -> (B,) each."""
    hit = in_bucket & match[:, None]
    return tl.sum(tl.where(hit, counts[:, None], 0), 0), tl.sum(tl.where(hit, weighted[:, None], 0.0), 0)


@triton.jit
def _radix_histogram_kernel(
    values_ptr,
    counts_ptr,
    weight_ptr,
    reciprocal_ptr,
    block_segment_ptr,
    block_start_ptr,
    offsets_ptr,
    prefix_ptr,
    hist_count_ptr,
    hist_sum_ptr,
    shift,
    d_in,
    stride_row,
    stride_col,
    HAS_COUNTS: tl.constexpr,
    SALIENCY: tl.constexpr,
    BITS: tl.constexpr,
    BLOCK: tl.constexpr,
    CHUNK: tl.constexpr,
):
    BUCKETS: tl.constexpr = 1 << BITS
    segment = tl.load(block_segment_ptr + tl.program_id(0))
    start = tl.load(block_start_ptr + tl.program_id(0))
    end = tl.load(offsets_ptr + segment + 1)
    prefix0 = tl.load(prefix_ptr + segment * 2)
    prefix1 = tl.load(prefix_ptr + segment * 2 + 1)
    separate = prefix0 != prefix1  # while the targets share their prefix, one histogram serves both
    buckets = tl.arange(0, BUCKETS)
    count0 = tl.zeros([BUCKETS], tl.int64)
    count1 = tl.zeros([BUCKETS], tl.int64)
    sum0 = tl.zeros([BUCKETS], tl.float64)
    sum1 = tl.zeros([BUCKETS], tl.float64)
    # The block's histograms are summed in registers, a chunk at a time through a (CHUNK, BUCKETS) one-hot
    # tile, and flushed with one atomic per non-empty bucket: clustered exponents put most elements of a
    # matrix into a few buckets, where per-element global atomics would serialise.
    for chunk in tl.range(0, tl.minimum(BLOCK, end - start), CHUNK):
        index = start + chunk + tl.arange(0, CHUNK)
        ok = index < end
        if SALIENCY:  # s_ij = (w_ij * w_ij) * reciprocal_j, computed on the fly and never stored
            row = index // d_in
            col = index % d_in
            w = tl.load(weight_ptr + row * stride_row + col * stride_col, mask=ok, other=0.0).to(tl.float32)
            reciprocal = tl.load(reciprocal_ptr + col, mask=ok, other=1.0)
            values = w * w * reciprocal  # the reference's two fp32 products, in its order
        else:
            values = tl.load(values_ptr + index, mask=ok, other=0.0)
        if HAS_COUNTS:
            counts = tl.load(counts_ptr + index, mask=ok, other=0)
        else:
            counts = tl.full([CHUNK], 1, tl.int64)
        key = values.to(tl.int32, bitcast=True).to(tl.int64)
        in_bucket = ((key >> shift) & (BUCKETS - 1))[:, None] == buckets[None, :]
        high = key >> (shift + BITS)
        weighted = values.to(tl.float64) * counts.to(tl.float64)
        chunk_count, chunk_sum = _bucket_totals(in_bucket, ok & (high == prefix0), counts, weighted)
        count0 += chunk_count
        sum0 += chunk_sum
        if separate:
            chunk_count, chunk_sum = _bucket_totals(in_bucket, ok & (high == prefix1), counts, weighted)
            count1 += chunk_count
            sum1 += chunk_sum
    if not separate:
        count1 = count0
        sum1 = sum0
    base = segment * 2 * BUCKETS + buckets  # relaxed atomics: the histograms are read only after the kernel
    tl.atomic_add(hist_count_ptr + base, count0, mask=count0 != 0, sem="relaxed")
    tl.atomic_add(hist_sum_ptr + base, sum0, mask=count0 != 0, sem="relaxed")
    tl.atomic_add(hist_count_ptr + base + BUCKETS, count1, mask=count1 != 0, sem="relaxed")
    tl.atomic_add(hist_sum_ptr + base + BUCKETS, sum1, mask=count1 != 0, sem="relaxed")


def _chunk(device: torch.device) -> int:
    """Elements per loop step: CHUNK on a GPU (registers); the whole block under the CPU interpreter,
    which pays per loop step (the multi-chunk loop is still tested there with ``chunk=CHUNK``)."""
    return CHUNK if device.type == "cuda" else BLOCK


def _launch(sources, geometry, table, hist_count, hist_sum, has_counts, saliency, block, chunk, device) -> None:
    """One histogram pass. sources: (values, counts, weight, reciprocal) pointers (unused ones stand in for
    any tensor); geometry: (d_in, stride_row, stride_col) of the weight; table: (segment, start, offsets,
    prefix, shift, bits)."""
    segment = table[0]
    _radix_histogram_kernel[(segment.numel(),)](
        *sources, *table[:4], hist_count, hist_sum, table[4], *geometry,
        HAS_COUNTS=has_counts, SALIENCY=saliency, BITS=table[5], BLOCK=block,
        CHUNK=min(block, chunk or _chunk(device)),
    )  # fmt: skip


def _triton_histogram(
    values, counts, segment, start, offsets, prefix, shift, bits, hist_count, hist_sum, block, chunk=None
) -> None:
    sources = (values, counts if counts is not None else values, values, values)
    table = (segment, start, offsets, prefix, shift, bits)
    _launch(sources, (1, 0, 0), table, hist_count, hist_sum, counts is not None, False, block, chunk, values.device)


def _triton_saliency_histogram(
    weight, reciprocal, segment, start, offsets, prefix, shift, bits, hist_count, hist_sum, block, chunk=None
) -> None:
    geometry = (weight.shape[1], weight.stride(0), weight.stride(1))
    table = (segment, start, offsets, prefix, shift, bits)
    sources = (reciprocal, reciprocal, weight, reciprocal)
    _launch(sources, geometry, table, hist_count, hist_sum, False, True, block, chunk, weight.device)


WIDTHS = (RADIX_BITS,) * (32 // RADIX_BITS)
topk_mean_and_effective_rank = make_selection(_triton_histogram, BLOCK, WIDTHS)
saliency_topk_mean_and_effective_rank = make_saliency_selection(_triton_saliency_histogram, BLOCK, WIDTHS)
