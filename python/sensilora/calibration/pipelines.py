"""Pipelines: how calibration batches reach the target layers (one class per way, as llm-compressor's).

- ``WholeModel``: every batch through the whole model on the device its weights are on.
- ``Dispatched``: a model placed by accelerate (``device_map``): inputs go to its first device, offloaded
  weights are loaded by accelerate's hooks module by module.
- ``LayerSequential``: the model stays where it is; the decoder layers run one at a time on one device
  over every captured batch (``sequential.run_sequentially``), for models larger than the device.

A pipeline says which observers it can feed (``refuse``) and whether its sums can be checkpointed between
batches (``resumable``), so an impossible pairing is refused by the parts themselves.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..errors import SensiloraError
from .batches import BatchSource, PreparedBatch, input_device, model_inputs, to_device
from .observers import Observer
from .sequential import decoder_layers, run_sequentially

AfterBatch = Callable[[], None]  # called after each batch the pipeline finished (the checkpoint's moment)


def forward_kwargs(model: nn.Module, logits: bool = False) -> dict[str, Any]:
    """Extra keyword arguments for a statistics-only forward: no KV cache, and (unless ``logits``, which the
    loss-aware statistic needs) logits for the last position only, where the model takes these options:
    the LM head of a small model is a large share of its forward (SmolLM2: 49152 x 576 per token)."""
    try:
        parameters = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return {}
    extra = {"use_cache": False} if "use_cache" in parameters else {}
    if not logits and "logits_to_keep" in parameters:
        extra["logits_to_keep"] = 1
    return extra


def needs_every_logit(model: nn.Module, observer: Observer) -> bool:
    """Whether the forward must compute the LM head at every position: for a loss-aware observer, or when
    the head itself is a target (with logits for the last position only it would see one token a row)."""
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    return observer.needs_logits or any(
        module is head for name, module in model.named_modules() if name in observer.shapes
    )


class WholeModel:
    """Each batch through the whole model, on the device of its first parameter."""

    resumable = True  # its sums are complete after every batch: a checkpoint can save them

    def __init__(self, model: nn.Module):
        self.model = model

    @classmethod
    def check(cls, observer: type[Observer], device: object) -> None:
        """Raise if this pipeline cannot feed ``observer`` on ``device`` (the whole model feeds every one)."""

    @property
    def device(self) -> torch.device:
        """Where the forward's inputs go."""
        return next(self.model.parameters()).device

    def accumulator_devices(self, targets: dict[str, nn.Module]) -> dict[str, torch.device]:
        """Where each target's sums live (its weight's device): a resumed checkpoint is restored there."""
        return {name: module.weight.device for name, module in targets.items()}

    def inputs(self, observer: Observer, item: PreparedBatch) -> dict[str, Any]:
        """The forward's keyword arguments for a batch (the observer's labels, encoder-decoder inputs)."""
        return model_inputs(self.model, observer.prepare(self.model, item.batch))

    def run(self, source: BatchSource, observer: Observer, after_batch: AfterBatch) -> None:
        extra = forward_kwargs(self.model, logits=needs_every_logit(self.model, observer))
        device = self.device
        for item in source:
            with observer.batch(item.mask, item.real_tokens):
                observer.forward(self.model, to_device(self.inputs(observer, item), device), extra)
            if not observer.accumulators:
                raise SensiloraError(
                    "no target module ran during the forward pass; check target_modules and the batch keys"
                )
            observer.check_finite(item.index)
            after_batch()


class Dispatched(WholeModel):
    """A model dispatched by accelerate (``hf_device_map``): inputs to its first accelerator (or the CPU);
    offloaded weights are ``meta`` outside their forward, so their sums live where the inputs go."""

    @property
    def device(self) -> torch.device:
        return input_device(self.model)

    def accumulator_devices(self, targets: dict[str, nn.Module]) -> dict[str, torch.device]:
        return {
            name: module.weight.device if module.weight.device.type != "meta" else self.device
            for name, module in targets.items()
        }


class LayerSequential(WholeModel):
    """Decoder layers one at a time on ``device`` over every batch; the rest of the model moves there once."""

    resumable = False  # the sums of a layer-by-layer run are complete only after the last layer

    def __init__(self, model: nn.Module, targets: dict[str, nn.Module], device: torch.device):
        if any(parameter.device.type == "meta" for parameter in model.parameters()):
            raise SensiloraError(
                "sequential mode moves the layers itself, but accelerate offloaded this model's weights "
                "(device_map): calibrate it without sequential (the offload already keeps one module's weights in "
                "memory at a time)"
            )
        super().__init__(model)
        _, self.layers = decoder_layers(model, targets)
        self.layer_device = device

    @classmethod
    def check(cls, observer: type[Observer], device: object) -> None:
        if observer.needs_backward:
            raise SensiloraError(
                f"statistic={observer.statistic!r} needs a backward pass through the whole model: use sequential=False"
            )
        if str(device) == "auto":
            raise SensiloraError("sequential mode moves one layer at a time to one device: give --device cuda (or cpu)")

    def run(self, source: BatchSource, observer: Observer, after_batch: AfterBatch) -> None:
        items = [(item, self.inputs(observer, item)) for item in source]
        extra = forward_kwargs(self.model, logits=needs_every_logit(self.model, observer))
        run_sequentially(self.model, self.layers, items, self.layer_device, observer, extra)


def pipeline_class(sequential: bool) -> type[WholeModel]:
    """The kind of pipeline ``calibrate``'s ``sequential`` option asks for (a dispatched model is told apart
    only once it is given: ``build_pipeline``)."""
    return LayerSequential if sequential else WholeModel


def build_pipeline(
    model: nn.Module, targets: dict[str, nn.Module], sequential: bool, device: str | torch.device | None
) -> WholeModel:
    """The pipeline for a model and the ``sequential``/``device`` options of ``calibrate``."""
    if sequential:
        return LayerSequential(model, targets, torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu")))
    if getattr(model, "hf_device_map", None):
        return Dispatched(model)
    return WholeModel(model)
