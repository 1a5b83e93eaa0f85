"""Damped Cholesky inverse diagonals: ``diag(H^-1) = column sums of squares of L^-1`` (H = L L^T).

Damping, dead columns and escalation are the library's (``damped_inverse_diagonal``); only the last
step differs from the reference: the triangular inverse's columns are reduced by the
``column_sumsq`` kernel instead of forming ``H^-1``.
"""

from __future__ import annotations

import torch
from sensilora.ops.reference import damped_inverse_diagonal

from .column_sumsq import column_sumsq_


def _diagonal_from_factor(factor: torch.Tensor) -> torch.Tensor:
    eye = torch.eye(factor.shape[-1], dtype=factor.dtype, device=factor.device).expand_as(factor)
    inverse_factor = torch.linalg.solve_triangular(factor, eye, upper=False)
    result = torch.zeros(factor.shape[:-1], dtype=torch.float32, device=factor.device)
    for out, rows in zip(result, inverse_factor):
        column_sumsq_(out, rows)
    return result


def inverse_diagonal(hessian: torch.Tensor, damp: float = 0.01):
    """hessian (d, d) or (B, d, d) -> (inverse diagonal fp32 (..., d), damp used fp32)."""
    return damped_inverse_diagonal(hessian, damp, _diagonal_from_factor)
