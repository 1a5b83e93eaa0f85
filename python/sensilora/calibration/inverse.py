"""Damped inverse-Hessian diagonals of many Hessians in bounded memory (obs mode, METHOD.md section 1)."""

from __future__ import annotations

import torch

from .. import ops

# Hessians of one size are inverted together up to this many bytes of fp32 d x d matrices at a time: the
# inversion's temporaries (a copy, the factor, its inverse) are a few chunks, whatever the model's size
# (LLaMA-3.1-8B: two 14336 x 14336 grams, or 32 of 4096 x 4096, a chunk).
INVERSE_CHUNK_BYTES = 2**31


def inverse_diagonals(
    hessians: dict[str, torch.Tensor], damp: float, chunk_bytes: int = INVERSE_CHUNK_BYTES
) -> dict[str, tuple[torch.Tensor, float]]:
    """``{key: (diag((H + lambda I)^-1) (d,) fp32, the damp used)}`` for ``{key: H (d, d) fp32}``.

    Equal sizes on one device are stacked and inverted (``ops.inverse_diagonal``) in chunks of at most
    ``chunk_bytes``; each Hessian leaves ``hessians`` as it is stacked, so one whose last reference
    was that dict is freed before the next chunk starts."""
    by_size: dict[tuple, list[str]] = {}
    for key, hessian in hessians.items():
        by_size.setdefault((hessian.shape[0], hessian.device), []).append(key)
    results = {}
    for (size, _), keys in by_size.items():
        per_chunk = max(1, chunk_bytes // (size * size * 4))
        for start in range(0, len(keys), per_chunk):
            chunk = keys[start : start + per_chunk]
            stacked = torch.stack([hessians.pop(key) for key in chunk])
            inverse, damps = ops.inverse_diagonal(stacked, damp)
            del stacked
            for key, diagonal, used in zip(chunk, inverse, damps.tolist()):
                results[key] = (diagonal.clone(), used)
    return results
