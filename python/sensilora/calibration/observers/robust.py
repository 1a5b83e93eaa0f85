"""The Hessian diagonal robust to massive activations (METHOD.md section 1d): the paper's ``(2/N) sum x^2``
over the tokens whose activation norm at that input is within ``OUTLIER_RATIO`` times the median token's.

On LLaMA-family models a few tokens (the attention sink at position 0, but also delimiters anywhere in the
text) carry activations hundreds of times the others' at some inputs, above all the ``down_proj`` inputs of
a few layers; in a sum of squares they outweigh every other token together and decide the allocation.
Here each module input drops its own outlier tokens, wherever they stand; where no token is an outlier
(as on encoders), the result is the paper's statistic exactly.
"""

from __future__ import annotations

import torch

from .hessian import HessianDiagonal

OUTLIER_RATIO = 10.0  # a token whose activation norm exceeds this multiple of the median token's is an outlier


def token_norms(x: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(x.shape[:-1]) fp32 L2 norms of ``x``'s tokens over the last axis, and the median norm of the real
    tokens (``mask``; None: all), None where no token is real. x: (..., d) any float dtype."""
    norms = torch.linalg.vector_norm(x.detach(), dim=-1, dtype=torch.float32)
    real = norms if mask is None else norms[mask.bool()]
    return norms, (real.median() if real.numel() else None)


def typical_tokens(x: torch.Tensor, mask: torch.Tensor | None, ratio: float = OUTLIER_RATIO) -> torch.Tensor:
    """(x.shape[:-1]) bool: the real tokens (``mask``; None: all) whose L2 norm over the last axis is at
    most ``ratio`` times the median norm of the real tokens. x: (..., d) any float dtype; norms in fp32."""
    norms, median = token_norms(x, mask)
    kept = torch.ones_like(norms, dtype=torch.bool) if mask is None else mask.bool().clone()
    if median is not None:
        kept &= norms <= ratio * median
    return kept


class RobustHessianDiagonal(HessianDiagonal):
    """``diag(H)`` over each input's typical tokens (forward passes only; one host sync per input and batch
    to count the tokens kept). ``num_tokens`` of each input counts the tokens it kept."""

    statistic = "hessian-robust"

    def _mask_for(self, name: str, x: torch.Tensor) -> tuple[torch.Tensor | None, int]:
        mask, _ = super()._mask_for(name, x)
        kept = typical_tokens(x, mask)
        return kept, int(kept.sum())


def clipping_weights(x: torch.Tensor, mask: torch.Tensor | None, ratio: float = OUTLIER_RATIO) -> torch.Tensor:
    """(x.shape[:-1]) fp32 per-token weights of the squared activations that clip each token's L2 norm at
    ``ratio`` times the median norm of the real tokens (``mask``; None: all): ``min(1, (ratio m / ||x_n||)^2)``,
    1 for a zero token. x: (..., d) any float dtype."""
    norms, median = token_norms(x, mask)
    if median is None:
        return torch.ones_like(norms)
    return (ratio * median / norms).square().nan_to_num(posinf=1.0).clamp(max=1.0)


class ClippedHessianDiagonal(HessianDiagonal):
    """``diag(H)`` with every token's activation scaled down to at most ``OUTLIER_RATIO`` times the median
    token's norm at that input (METHOD.md section 1d): an outlier token still counts, as a typical large
    one; ``num_tokens`` counts every real token. Where no token is an outlier, the paper's statistic."""

    statistic = "hessian-clipped"

    def _row_weight(self, x: torch.Tensor, mask: torch.Tensor | None, row_weight: torch.Tensor | None):
        return clipping_weights(x, mask)
