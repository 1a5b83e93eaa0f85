"""Token-major views shared by every backend's launchers (torch only: the CUDA backend needs no Triton)."""

from __future__ import annotations

import torch


def token_view(x: torch.Tensor, mask: torch.Tensor | None):
    """(..., d) -> a (B, T, d) view of x (no copy when the strides allow it) and a (B, T) uint8 mask or None."""
    if x.dim() == 1:
        x3 = x[None, None]
    elif x.dim() == 2:
        x3 = x[None]
    elif x.dim() == 3:
        x3 = x
    else:
        try:
            x3 = x.view(-1, x.shape[-2], x.shape[-1])
        except RuntimeError:  # leading dims that cannot be merged without a copy
            x3 = x.reshape(-1, x.shape[-2], x.shape[-1])
    mask3 = None
    if mask is not None:
        mask3 = mask.reshape(x3.shape[:2])
        mask3 = mask3.view(torch.uint8) if mask3.dtype == torch.bool else (mask3 != 0).to(torch.uint8)
    return x3, mask3


def row_weight_view(x3: torch.Tensor, row_weight: torch.Tensor | None) -> torch.Tensor | None:
    """The per-token weights as a (B, T) fp32 view matching ``x3`` (token_view's), or None."""
    return None if row_weight is None else row_weight.float().reshape(x3.shape[:2])


def optional_strides(per_token: torch.Tensor | None) -> tuple[int, int]:
    """The (B, T) strides of an optional per-token tensor, the mask or the row weights (0, 0 without one)."""
    return (0, 0) if per_token is None else per_token.stride()
