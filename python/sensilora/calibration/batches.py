"""Calibration batches in the forms users have them, which of their tokens are counted, and the stream the
pipelines consume (``BatchSource``: progress, the fingerprint, and the skip of batches a checkpoint summed)."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from ..errors import SensiloraError


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


def combined_fingerprint(fingerprints: list[str]) -> str:
    """One fingerprint for several shards' (torchrun ranks in rank order, merged files sorted): a single
    shard's own fingerprint, else the SHA-256 of theirs joined."""
    if len(fingerprints) == 1:
        return fingerprints[0]
    return hashlib.sha256(",".join(fingerprints).encode()).hexdigest()


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


@dataclass
class PreparedBatch:
    """One calibration batch as a pipeline runs it. index: its place in the stream (0-based); mask: (B, T)
    bool, the tokens the statistics count (None: every token); real_tokens: how many; batch: the batch dict
    as given (CPU tensors)."""

    index: int
    mask: torch.Tensor | None
    real_tokens: int
    batch: dict[str, Any]


class BatchSource:
    """The calibration batches in order, each hashed into ``fingerprint`` and counted in ``seen``; batches
    that are all padding are counted but not yielded. ``resume_after`` makes the source skip (hash, not
    yield) the batches a checkpoint already summed, and prove they are the same data."""

    def __init__(self, batches: Any, exclude_first: int = 0, progress: bool = True, description: str = ""):
        self._batches = batches
        self.exclude_first = exclude_first
        self.progress = progress
        self.description = description
        self.fingerprint = DataFingerprint()
        self.seen = 0
        self.resume_at = 0
        self._resume_fingerprint: str | None = None
        self._checkpoint = None

    def resume_after(self, batches: int, fingerprint: str | None, checkpoint: object) -> None:
        """Skip the first ``batches`` batches, which must hash to ``fingerprint`` (saved in ``checkpoint``)."""
        self.resume_at, self._resume_fingerprint, self._checkpoint = batches, fingerprint, checkpoint

    def total(self) -> int | None:
        """How many batches the stream holds, when it knows (for the progress bar)."""
        batches = self._batches
        return (
            len(batches) if hasattr(batches, "__len__") and not isinstance(batches, (torch.Tensor, Mapping)) else None
        )

    def __iter__(self) -> Iterator[PreparedBatch]:
        stream = tqdm(
            iterate_batches(self._batches), total=self.total(), desc=self.description, disable=not self.progress
        )
        for batch in stream:
            self.seen += 1
            self.fingerprint.add(batch)
            if self.seen <= self.resume_at:  # summed before the checkpoint: hashed to prove it is the same data
                if self.seen == self.resume_at:
                    self._check_resumed()
                continue
            prepared = self._prepare(self.seen - 1, batch)
            if prepared is not None:
                yield prepared
        if self.seen < self.resume_at:
            raise SensiloraError(
                f"the calibration data has {self.seen} batches but checkpoint {self._checkpoint} already summed "
                f"{self.resume_at}: resume with the same data, or delete the checkpoint to start afresh"
            )

    def _check_resumed(self) -> None:
        if self.fingerprint.hexdigest() != self._resume_fingerprint:
            raise SensiloraError(
                f"the first batches of the calibration data differ from those summed in checkpoint {self._checkpoint}: "
                "resume with the same data, order and batch size, or delete the checkpoint to start afresh"
            )

    def _prepare(self, index: int, batch: dict[str, Any]) -> PreparedBatch | None:
        mask = batch.get("attention_mask")
        ids = batch.get("input_ids")
        if isinstance(mask, torch.Tensor) and isinstance(ids, torch.Tensor) and mask.shape != ids.shape:
            raise SensiloraError(
                f"calibration batch {index}: attention_mask has shape {tuple(mask.shape)} but input_ids "
                f"{tuple(ids.shape)}; give one mask entry per token"
            )
        if self.exclude_first:
            if isinstance(ids, torch.Tensor) and ids.dim() == 2 and self.exclude_first >= ids.shape[1]:
                raise SensiloraError(
                    f"exclude_first={self.exclude_first} leaves no token of calibration batch {index}'s "
                    f"{ids.shape[1]}-token rows: lower exclude_first or use longer sequences"
                )
            mask = torch.ones(batch["input_ids"].shape, dtype=torch.bool) if mask is None else mask
            mask = sequence_start_mask(mask.bool(), self.exclude_first)
        if mask is None:
            real = int(batch["input_ids"].numel()) if "input_ids" in batch else 0
            return PreparedBatch(index, None, real, batch)
        mask = mask.bool()
        real = int(mask.sum())
        return PreparedBatch(index, mask, real, batch) if real else None
