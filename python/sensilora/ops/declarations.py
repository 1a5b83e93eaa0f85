"""The op table and the ops' definitions in torch's dispatcher (see ``sensilora.ops``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from . import reference

NAMESPACE = "sensilora"


@dataclass(frozen=True)
class OpSpec:
    """One op: ``name`` and ``schema`` as the dispatcher knows them, the torch ``reference`` (every
    device's default) and the ``fake`` function that gives output shapes without computing (None for
    ops that only mutate their first argument)."""

    name: str
    schema: str
    reference: Callable
    fake: Callable | None = None


def _no_output(*args, **kwargs) -> None:
    return None


def _fake_inverse_diagonal(hessian, damp=0.01):
    return (
        hessian.new_empty(hessian.shape[:-1], dtype=torch.float32),
        hessian.new_empty(hessian.shape[:-2], dtype=torch.float32),
    )


def _fake_selection(values, offsets, counts=None, k_frac=0.5, alpha=0.85):
    segments = offsets.shape[0] - 1
    return (
        values.new_empty((segments,), dtype=torch.float64),
        values.new_empty((segments,), dtype=torch.float64),
        values.new_empty((segments,), dtype=torch.int64),
    )


def _fake_saliency_selection(weight, inverse_diag, k_frac=0.5, alpha=0.85):
    return (
        weight.new_empty((1,), dtype=torch.float64),
        weight.new_empty((1,), dtype=torch.float64),
        weight.new_empty((1,), dtype=torch.int64),
    )


OPS: tuple[OpSpec, ...] = (
    OpSpec(
        "column_sumsq_",
        "(Tensor(a!) acc, Tensor x, Tensor? mask=None, Tensor? row_weight=None) -> ()",
        reference.column_sumsq_,
        _no_output,
    ),
    OpSpec("gram_", "(Tensor(a!) gram, Tensor x, Tensor? mask=None) -> ()", reference.gram_, _no_output),
    OpSpec(
        "inverse_diagonal",
        "(Tensor hessian, float damp=0.01) -> (Tensor, Tensor)",
        reference.inverse_diagonal,
        _fake_inverse_diagonal,
    ),
    OpSpec(
        "topk_mean_and_effective_rank",
        "(Tensor values, Tensor offsets, Tensor? counts=None, float k_frac=0.5, float alpha=0.85) "
        "-> (Tensor, Tensor, Tensor)",
        reference.topk_mean_and_effective_rank,
        _fake_selection,
    ),
    OpSpec(
        "saliency_topk_mean_and_effective_rank",
        "(Tensor weight, Tensor inverse_diag, float k_frac=0.5, float alpha=0.85) -> (Tensor, Tensor, Tensor)",
        reference.saliency_topk_mean_and_effective_rank,
        _fake_saliency_selection,
    ),
)
OP_NAMES = tuple(spec.name for spec in OPS)

_LIBRARY = torch.library.Library(NAMESPACE, "DEF")  # lives as long as the module: the ops' definitions
for _spec in OPS:
    _LIBRARY.define(_spec.name + _spec.schema)
    _LIBRARY.impl(_spec.name, _spec.reference, "CompositeExplicitAutograd")
    torch.library.register_fake(f"{NAMESPACE}::{_spec.name}", _spec.fake, lib=_LIBRARY)

column_sumsq_ = torch.ops.sensilora.column_sumsq_
"""``acc[j] += sum over real tokens of w * x[..., j]^2``: acc (d,) fp32 in place; x (..., d) bf16/fp16/fp32;
mask x.shape[:-1]; row_weight fp32 x.shape[:-1] or None (w = 1)."""
gram_ = torch.ops.sensilora.gram_
"""``gram += x^T x`` over real tokens: gram (d, d) fp32 in place; x (..., d); mask x.shape[:-1]."""
inverse_diagonal = torch.ops.sensilora.inverse_diagonal
"""Damped Cholesky ``diag(H^-1)``: hessian (d, d) or (B, d, d) -> (fp32 (..., d), damp used fp32 (B,) or ())."""
topk_mean_and_effective_rank = torch.ops.sensilora.topk_mean_and_effective_rank
"""Per-segment (total fp64, top-k mean fp64, effective rank int64); see ``reference.topk_mean_and_effective_rank``."""
saliency_topk_mean_and_effective_rank = torch.ops.sensilora.saliency_topk_mean_and_effective_rank
"""Selection over the obs saliencies ``s_ij = (w_ij * w_ij) * (1 / inverse_diag_j)`` (fp32, METHOD.md) of one
(d_out, d_in) matrix; outputs of shape (1,)."""
