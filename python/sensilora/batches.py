"""Calibration batches in the forms users have them, and which of their tokens are counted."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Iterator

import torch

from .errors import SensiloraError


def as_batch(item: Any) -> dict[str, Any]:
    if isinstance(item, torch.Tensor):
        return {"input_ids": item if item.dim() > 1 else item[None]}
    if isinstance(item, Mapping):
        return dict(item)
    if isinstance(item, (tuple, list)) and item and isinstance(item[0], torch.Tensor):
        return {"input_ids": item[0], **({"attention_mask": item[1]} if len(item) > 1 else {})}
    raise SensiloraError(
        f"calibration batch of type {type(item).__name__} is not supported: give dicts with 'input_ids' "
        "(and 'attention_mask'), input_ids tensors, or a DataLoader yielding either"
    )


def iterate_batches(batches: Any) -> Iterator[dict[str, Any]]:
    if isinstance(batches, (torch.Tensor, Mapping)):
        batches = [batches]
    for item in batches:
        yield as_batch(item)


def sequence_start_mask(mask: torch.Tensor, exclude_first: int) -> torch.Tensor:
    """(B, T) bool: the real tokens of ``mask`` from the ``exclude_first``-th real token of each sequence on
    (drops the attention sink: position 0 of a window often carries massive activations, METHOD.md 1c)."""
    position = mask.long().cumsum(dim=1) - 1
    return mask & (position >= exclude_first)
