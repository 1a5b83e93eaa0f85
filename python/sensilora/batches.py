"""Calibration batches in the forms users have them, and which of their tokens are counted."""

from __future__ import annotations

import hashlib
import json
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


def model_inputs(model, batch: dict[str, Any]) -> dict[str, Any]:
    """The forward's keyword arguments for a calibration batch. Encoder-decoder models (T5, BART) also get
    decoder inputs as in training: the input ids shifted right (``prepare_decoder_input_ids_from_labels``)
    with the attention mask shifted alike. The statistics mask both stacks with the encoder's mask, so a
    decoder module counts the start token and misses each sequence's last token (same count, shifted by one)."""
    config = getattr(model, "config", None)
    if not getattr(config, "is_encoder_decoder", False) or "decoder_input_ids" in batch:
        return batch
    prepare = getattr(model, "prepare_decoder_input_ids_from_labels", None)
    if prepare is None:
        raise SensiloraError(
            f"{type(model).__name__} is an encoder-decoder model without prepare_decoder_input_ids_from_labels; "
            "give calibration batches with decoder_input_ids"
        )
    extra = {"decoder_input_ids": prepare(labels=batch["input_ids"])}
    mask = batch.get("attention_mask")
    if mask is not None:
        extra["decoder_attention_mask"] = torch.cat([torch.ones_like(mask[:, :1]), mask[:, :-1]], dim=1)
    return {**batch, **extra}


class DataFingerprint:
    """SHA-256 over the token ids and masks of every calibration batch, in order: equal fingerprints mean
    the statistics were computed on the same tokens."""

    def __init__(self):
        self._hash = hashlib.sha256()

    def add(self, batch: dict[str, Any]) -> None:
        for key in ("input_ids", "attention_mask"):
            value = batch.get(key)
            if isinstance(value, torch.Tensor):
                self._hash.update(key.encode() + str(tuple(value.shape)).encode())
                self._hash.update(value.detach().to("cpu", torch.int64).contiguous().numpy().tobytes())

    def hexdigest(self) -> str:
        return self._hash.hexdigest()


def model_config_hash(model) -> str | None:
    """SHA-256 of the model's configuration (``config.to_json_string``, sorted keys), None without one."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_dict"):
        return None
    return hashlib.sha256(json.dumps(config.to_dict(), sort_keys=True, default=str).encode()).hexdigest()


def to_device(value: Any, device: torch.device) -> Any:
    """``value`` with every tensor in it (nested tuples, lists and dicts too) moved to ``device``."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, (tuple, list)):
        return type(value)(to_device(v, device) for v in value)
    if isinstance(value, dict):
        return {k: to_device(v, device) for k, v in value.items()}
    return value


def input_device(model) -> torch.device:
    """Where a forward's inputs go: for a model dispatched by accelerate (``hf_device_map``), its first
    accelerator in the map, else the CPU (offloaded weights are on ``meta`` until their hook loads them);
    otherwise the device of the model's first parameter."""
    device_map = getattr(model, "hf_device_map", None)
    if device_map:
        placed = [d for d in device_map.values() if str(d) not in ("cpu", "disk")]
        return (
            torch.device(f"cuda:{placed[0]}" if isinstance(placed[0], int) else placed[0])
            if placed
            else torch.device("cpu")
        )
    return next(model.parameters()).device
