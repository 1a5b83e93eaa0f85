"""The CUDA extension backend (``csrc/``): column_sumsq and the radix histogram passes (flat and fused obs).

The extension ``sensilora_kernels._C`` exists only where ``setup.py`` could build it (CUDA torch and
nvcc); without it ``AVAILABLE`` is False and ``IMPORT_ERROR`` says why. This module needs no Triton.
"""

from __future__ import annotations

import importlib.util

import torch

from .radix_select import make_saliency_selection, make_selection
from .views import row_weight_view, token_view

if importlib.util.find_spec(f"{__package__}._C") is None:
    AVAILABLE, IMPORT_ERROR = False, f"{__package__}._C was not built"
else:
    try:
        from . import _C  # noqa: F401  (registers torch.ops.sensilora_cuda.*)
    except ImportError as error:  # built, but does not load (e.g. built against another torch)
        AVAILABLE, IMPORT_ERROR = False, f"{__package__}._C does not load: {error}"
    else:
        AVAILABLE, IMPORT_ERROR = True, None


def column_sumsq_(
    acc: torch.Tensor, x: torch.Tensor, mask: torch.Tensor | None = None, row_weight: torch.Tensor | None = None
) -> None:
    x3, mask3 = token_view(x, mask)
    torch.ops.sensilora_cuda.column_sumsq_(acc, x3, mask3, row_weight_view(x3, row_weight))


# Elements a thread block histograms: large enough that zeroing and flushing its 2048 shared slots is small
# beside its 128 elements a thread; a reasoned default, not tuned on a GPU.
CUDA_SELECTION_BLOCK = 32768
CUDA_WIDTHS = (11, 10, 10)  # bits a pass over the 31 bits below the (zero) sign: csrc/radix_select.cu


# A block's exact sums are 64-bit integers in units of at most 2^25 a value: its multiplicities must add up
# to less than 2^39 (diag mode's multiplicities are d_out, far below).
MAX_BLOCK_MULTIPLICITY = 1 << 39


def _cuda_histogram(
    values, counts, segment, start, offsets, prefix, shift, bits, hist_count, hist_sum, block, candidates=None
) -> None:
    torch.ops.sensilora_cuda.radix_histogram_(
        values, counts, segment, start, offsets, prefix, shift, bits, block, hist_count, hist_sum, *_out(candidates)
    )


def _cuda_saliency_histogram(
    weight, reciprocal, segment, start, offsets, prefix, shift, bits, hist_count, hist_sum, block, candidates=None
) -> None:
    torch.ops.sensilora_cuda.saliency_histogram_(
        weight, reciprocal, segment, start, offsets, prefix, shift, bits, block, hist_count, hist_sum,
        *_out(candidates),
    )  # fmt: skip


def _out(candidates) -> tuple:
    """(values, offsets, cursor) of the compaction, or three Nones."""
    return candidates if candidates is not None else (None, None, None)


_radix_selection = make_selection(_cuda_histogram, CUDA_SELECTION_BLOCK, CUDA_WIDTHS, compacts=True)


def topk_mean_and_effective_rank(values, offsets, counts=None, k_frac=0.5, alpha=0.85):
    """Same contract as ``sensilora.ops.reference.topk_mean_and_effective_rank``; multiplicities (one
    device sync to check them) must keep every block's total below ``MAX_BLOCK_MULTIPLICITY``."""
    if counts is not None and counts.numel() and int(counts.max()) * CUDA_SELECTION_BLOCK >= MAX_BLOCK_MULTIPLICITY:
        raise ValueError(
            f"topk_mean_and_effective_rank (cuda): multiplicities up to {int(counts.max())} could overflow the "
            f"exact 64-bit block sums; keep them below {MAX_BLOCK_MULTIPLICITY // CUDA_SELECTION_BLOCK} or use "
            "SENSILORA_BACKEND=torch"
        )
    return _radix_selection(values, offsets, counts, k_frac, alpha)


KERNELS = {
    "column_sumsq_": column_sumsq_,
    "topk_mean_and_effective_rank": topk_mean_and_effective_rank,
    "saliency_topk_mean_and_effective_rank": make_saliency_selection(
        _cuda_saliency_histogram, CUDA_SELECTION_BLOCK, CUDA_WIDTHS, _cuda_histogram
    ),
}
