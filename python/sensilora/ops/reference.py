"""Pure-PyTorch reference implementations of every op: the CPU path and the tests' ground truth.

Conventions shared by all backends:
* ``x`` is ``(..., d)`` in bf16/fp16/fp32; ``mask`` is ``None`` or a bool/int tensor of shape
  ``x.shape[:-1]`` whose zero entries (padding) are excluded; ``row_weight`` (column sums only) is ``None``
  or an fp32 tensor of shape ``x.shape[:-1]`` multiplying each token's squares.
* accumulators are fp32; selection sums are fp64.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from ..errors import SensiloraError

DAMP_GROWTH = 10.0
MAX_DAMP = 1.0


def _rows(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """(..., d) -> (n_real_tokens, d), padding rows removed (no copy when there is no mask)."""
    rows = x.reshape(-1, x.shape[-1])
    if mask is not None:
        rows = rows[mask.reshape(-1).bool()]
    return rows


def column_sumsq_(
    acc: torch.Tensor, x: torch.Tensor, mask: torch.Tensor | None = None, row_weight: torch.Tensor | None = None
) -> None:
    """``acc[j] += sum_n w_n x[n, j]^2`` over real tokens. acc: (d,) fp32, updated in place; row_weight:
    fp32 ``x.shape[:-1]`` (the loss-aware statistic's ``||dL/dy_n||^2``, METHOD.md section 1b) or None for 1."""
    squares = _rows(x, mask).float().square()
    if row_weight is not None:
        squares = squares * _rows(row_weight.float()[..., None], mask)
    acc.add_(squares.sum(dim=0))


def gram_(gram: torch.Tensor, x: torch.Tensor, mask: torch.Tensor | None = None) -> None:
    """``gram += x^T x`` over real tokens. gram: (d, d) fp32, updated in place."""
    rows = _rows(x, mask).float()
    gram.addmm_(rows.T, rows)


def cholesky_inverse_diagonal(factor: torch.Tensor) -> torch.Tensor:
    """diag((L L^T)^-1) from lower Cholesky factors L: (B, d, d) fp32 -> (B, d) fp32."""
    return torch.cholesky_inverse(factor).diagonal(dim1=-2, dim2=-1).clone()


def damped_inverse_diagonal(
    hessian: torch.Tensor,
    damp: float,
    diagonal_from_factor: Callable[[torch.Tensor], torch.Tensor],
    max_damp: float = MAX_DAMP,
) -> tuple[torch.Tensor, torch.Tensor]:
    """METHOD.md section 1 (obs mode): ``diag((H + lambda*I)^-1)``, ``lambda = damp * mean(diag H)``.

    Dead columns (``H_jj == 0``) get ``H_jj = 1``. Where Cholesky fails, damp grows tenfold per
    step up to ``max_damp``, then a ``SensiloraError`` is raised. ``diagonal_from_factor`` turns
    Cholesky factors into inverse diagonals (backends differ only there).

    hessian: (d, d) or (B, d, d), any float dtype. Returns (inverse_diag fp32 (..., d), damp used fp32 (B,) or ()).
    """
    if not 0 < damp <= max_damp:
        raise SensiloraError(f"inverse_diagonal: damp must be in (0, {max_damp}], got {damp}")
    single = hessian.dim() == 2
    batch = hessian.reshape(-1, hessian.shape[-2], hessian.shape[-1]).to(torch.float32, copy=True)
    diagonal = batch.diagonal(dim1=-2, dim2=-1)  # a view: the damping is added in place, no d x d temporaries
    diagonal[diagonal == 0] = 1.0
    mean_diag = diagonal.mean(dim=-1)
    damps = torch.full((batch.shape[0],), float(damp), dtype=torch.float32, device=batch.device)
    shifts = damps * mean_diag
    diagonal.add_(shifts[:, None])
    result = torch.empty(batch.shape[:2], dtype=torch.float32, device=batch.device)
    pending = torch.arange(batch.shape[0], device=batch.device)
    while pending.numel():
        everyone = pending.numel() == batch.shape[0]
        factor, info = torch.linalg.cholesky_ex(batch if everyone else batch[pending])
        ok = info == 0
        if bool(ok.all()):
            result[pending] = diagonal_from_factor(factor)
        elif ok.any():
            result[pending[ok]] = diagonal_from_factor(factor[ok])
        del factor
        pending = pending[~ok]
        if pending.numel():
            damps[pending] *= DAMP_GROWTH
            if bool((damps[pending] > max_damp * (1 + 1e-6)).any()):
                raise SensiloraError(
                    f"inverse_diagonal: Hessian #{int(pending[0])} is not positive definite even with "
                    f"damp={max_damp}; its statistics are degenerate (too few tokens or non-finite "
                    "activations): calibrate on more text or check the model's activations"
                )
            grown = damps[pending] * mean_diag[pending]
            diagonal[pending] += (grown - shifts[pending])[:, None]
            shifts[pending] = grown
    if single:
        return result[0], damps[0]
    return result, damps


def inverse_diagonal(hessian: torch.Tensor, damp: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """Damped, Cholesky-stabilised ``diag(H^-1)``; see ``damped_inverse_diagonal``."""
    return damped_inverse_diagonal(hessian, damp, cholesky_inverse_diagonal)


def topk_count(multiplicity: torch.Tensor, k_frac: float) -> torch.Tensor:
    """``k = ceil(k_frac * m)`` (at least 1), computed identically by every backend. int64 in, int64 out."""
    return torch.ceil(multiplicity.double() * k_frac).long().clamp_min(1)


def check_selection_args(values: torch.Tensor, offsets: torch.Tensor, counts, k_frac: float, alpha: float) -> None:
    if not 0 < k_frac <= 1:
        raise SensiloraError(f"k_frac must be in (0, 1], got {k_frac}")
    if not 0 < alpha <= 1:
        raise SensiloraError(f"alpha must be in (0, 1], got {alpha}")
    if values.dim() != 1 or offsets.dim() != 1 or offsets.numel() < 2:
        raise SensiloraError("selection: values must be 1-D and offsets hold S+1 segment boundaries (S >= 1)")
    if counts is not None and counts.shape != values.shape:
        raise SensiloraError("selection: counts must have one multiplicity per value")
    if bool((offsets[1:] <= offsets[:-1]).any()):
        raise SensiloraError("selection: every segment needs at least one value (offsets must increase)")


def _select_sorted(values: torch.Tensor, counts: torch.Tensor, k_frac: float, alpha: float):
    """One segment: sort descending (never expanding multiplicities), then cumsums in fp64."""
    order = torch.argsort(values, descending=True, stable=True)
    sorted_values = values[order].double()
    sorted_counts = counts[order]
    cum_counts = torch.cumsum(sorted_counts, 0)
    cum_sums = torch.cumsum(sorted_values * sorted_counts.double(), 0)
    total = cum_sums[-1]
    k = topk_count(cum_counts[-1:], k_frac)[0]
    group = int(torch.searchsorted(cum_counts, k))
    before_count = cum_counts[group - 1] if group else cum_counts.new_zeros(())
    before_sum = cum_sums[group - 1] if group else cum_sums.new_zeros(())
    topk_mean = (before_sum + (k - before_count).double() * sorted_values[group]) / k.double()
    if total <= 0:
        return total, topk_mean, torch.zeros((), dtype=torch.long)
    target = alpha * total
    last_positive = int((sorted_values > 0).sum()) - 1
    group = min(int(torch.searchsorted(cum_sums, target)), last_positive)
    before_count = int(cum_counts[group - 1]) if group else 0
    before_sum = float(cum_sums[group - 1]) if group else 0.0
    needed = math.ceil((float(target) - before_sum) / float(sorted_values[group]))
    needed = min(max(needed, 1), int(sorted_counts[group]))
    return total, topk_mean, torch.tensor(before_count + needed)


def topk_mean_and_effective_rank(
    values: torch.Tensor,
    offsets: torch.Tensor,
    counts: torch.Tensor | None = None,
    k_frac: float = 0.5,
    alpha: float = 0.85,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """METHOD.md section 2 (eqs. 8-10) for S segments of non-negative sensitivities at once.

    values: (n,) fp32 >= 0, segment s is ``values[offsets[s]:offsets[s+1]]``; counts: (n,) int64
    multiplicities (diag mode: d_out for every h_j) or None for 1. The sorted sequence is the
    values repeated by their counts, never materialised. Returns fp64 totals (S,), fp64 top-k
    means (S,) with ``k = ceil(k_frac*m)``, and int64 effective ranks (S,): the smallest k whose
    prefix reaches ``alpha`` of the total (0 for an all-zero segment).
    """
    check_selection_args(values, offsets, counts, k_frac, alpha)
    if counts is None:
        counts = torch.ones_like(values, dtype=torch.long)
    bounds = offsets.tolist()
    results = [
        _select_sorted(values[start:end].float(), counts[start:end].long(), k_frac, alpha)
        for start, end in zip(bounds[:-1], bounds[1:])
    ]
    totals, means, ranks = (torch.stack([r[i] for r in results]) for i in range(3))
    device = values.device
    return totals.to(device), means.to(device), ranks.long().to(device)


def saliency_reciprocal(inverse_diag: torch.Tensor) -> torch.Tensor:
    """``1 / [H^-1]_jj`` in fp32, rounded once per column: (d_in,) any float dtype -> fp32 (d_in,) contiguous."""
    return inverse_diag.float().reciprocal().contiguous()


def saliency(weight: torch.Tensor, inverse_diag: torch.Tensor) -> torch.Tensor:
    """OBS saliency ``s_ij = w_ij^2 / [H^-1]_jj``, computed in fp32 as ``(w_ij * w_ij) * (1 / [H^-1]_jj)``: one
    division per column, not per entry (every backend rounds the same two products, so they agree exactly).
    weight (d_out, d_in), inverse_diag (d_in,) -> fp32 (d_out, d_in)."""
    return weight.float().square().mul_(saliency_reciprocal(inverse_diag)[None, :])  # square() is a new tensor


def saliency_topk_mean_and_effective_rank(
    weight: torch.Tensor, inverse_diag: torch.Tensor, k_frac: float = 0.5, alpha: float = 0.85
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``topk_mean_and_effective_rank`` over one matrix's saliencies; each output has shape (1,)."""
    values = saliency(weight, inverse_diag).reshape(-1)
    offsets = torch.tensor([0, values.numel()], device=values.device)
    return topk_mean_and_effective_rank(values, offsets, None, k_frac, alpha)
