"""The CUDA extension backend (``csrc/``): column_sumsq and the radix histogram passes (flat and fused obs).

The extension ``sensilora_kernels._C`` exists only where ``setup.py`` could build it (CUDA torch and
nvcc); without it ``AVAILABLE`` is False and ``IMPORT_ERROR`` says why. This module needs no Triton.
"""

from __future__ import annotations

import importlib.util

import torch

from .radix_select import make_saliency_selection, make_selection
from .views import token_view

if importlib.util.find_spec(f"{__package__}._C") is None:
    AVAILABLE, IMPORT_ERROR = False, f"{__package__}._C was not built"
else:
    try:
        from . import _C  # noqa: F401  (registers torch.ops.sensilora_cuda.*)
    except ImportError as error:  # built, but does not load (e.g. built against another torch)
        AVAILABLE, IMPORT_ERROR = False, f"{__package__}._C does not load: {error}"
    else:
        AVAILABLE, IMPORT_ERROR = True, None


def column_sumsq_(acc: torch.Tensor, x: torch.Tensor, mask: torch.Tensor | None = None) -> None:
    x3, mask3 = token_view(x, mask)
    torch.ops.sensilora_cuda.column_sumsq_(acc, x3, mask3)


# Elements a thread block histograms: large enough that zeroing and flushing its 2 x 256 shared
# buckets is small beside its 32 elements a thread; a reasoned default, not tuned on a GPU.
CUDA_SELECTION_BLOCK = 8192


def _cuda_histogram(values, counts, segment, start, offsets, prefix, shift, hist_count, hist_sum, block) -> None:
    torch.ops.sensilora_cuda.radix_histogram_(
        values, counts, segment, start, offsets, prefix, shift, block, hist_count, hist_sum
    )


def _cuda_saliency_histogram(
    weight, inverse, segment, start, offsets, prefix, shift, hist_count, hist_sum, block
) -> None:
    torch.ops.sensilora_cuda.saliency_histogram_(
        weight, inverse, segment, start, offsets, prefix, shift, block, hist_count, hist_sum
    )


KERNELS = {
    "column_sumsq_": column_sumsq_,
    "topk_mean_and_effective_rank": make_selection(_cuda_histogram, CUDA_SELECTION_BLOCK),
    "saliency_topk_mean_and_effective_rank": make_saliency_selection(_cuda_saliency_histogram, CUDA_SELECTION_BLOCK),
}
