"""Layer-by-layer calibration (``calibrate(..., sequential=True)``) for models larger than the device.

The GPTQ-family pattern: the model stays where it is (usually the CPU); everything outside the decoder
layers moves to the device and runs once per batch until the first layer's inputs are captured; then each
layer in turn moves to the device, runs every captured batch (the statistics hooks collect as usual) and
hands its outputs to the next layer, and moves back. Peak device memory is about one layer plus the
activations of the calibration set, and the statistics equal the ordinary mode's (the same inputs reach
the same modules).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..errors import SensiloraError
from .batches import PreparedBatch, to_device
from .observers import Observer


class _Captured(Exception):
    """Raised by the first layer's pre-hook once its inputs are stored: the rest of the forward is skipped."""


def decoder_layers(model: nn.Module, targets: dict[str, nn.Module]) -> tuple[str, nn.ModuleList]:
    """The ModuleList of numbered blocks holding every target module, by name, or a clear error."""
    for name, module in model.named_modules():
        if (
            isinstance(module, nn.ModuleList)
            and len(module)
            and all(str(i) in module._modules for i in range(len(module)))
        ):
            prefix = f"{name}." if name else ""
            inside = [t for t in targets if t.startswith(prefix) and t[len(prefix) :].split(".")[0].isdigit()]
            if len(inside) == len(targets):
                return name, module
    raise SensiloraError(
        f"sequential calibration needs every target inside one list of numbered layers; {type(model).__name__} has "
        "targets outside it (or no such list): calibrate without sequential, or restrict target_modules to the layers"
    )


def _move(tensors: list[tuple[nn.Module, str]], devices: list[torch.device]) -> None:
    """Move each (owner module, attribute) parameter or buffer to its device, in place."""
    for (owner, name), device in zip(tensors, devices):
        tensor = getattr(owner, name)
        if name in owner._parameters:
            tensor.data = tensor.data.to(device)
        else:
            owner._buffers[name] = tensor.to(device)


def run_sequentially(
    model: nn.Module,
    layers: nn.ModuleList,
    items: list[tuple[PreparedBatch, dict[str, Any]]],
    device: torch.device,
    observer: Observer,
    extra: dict[str, Any],
) -> None:
    """Calibrate layer by layer over ``items`` ((batch, its forward inputs) pairs): each layer runs each
    batch inside ``observer.batch`` (so its hooks count that batch's tokens), then the observer checks the
    sums. Every module returns to where it was."""
    in_layers = {id(t) for layer in layers for t in (*layer.parameters(), *layer.buffers())}
    outside = [
        (owner, name)
        for owner in model.modules()
        for name, tensor in (*owner._parameters.items(), *owner._buffers.items())
        if tensor is not None and id(tensor) not in in_layers
    ]
    homes = [getattr(owner, name).device for owner, name in outside]
    captured: list[tuple[tuple, dict]] = []

    def capture(_module, args, kwargs):
        captured.append((to_device(args, device), to_device(kwargs, device)))
        raise _Captured

    _move(outside, [device] * len(outside))
    handle = layers[0].register_forward_pre_hook(capture, with_kwargs=True)
    try:
        for _, inputs in items:
            try:
                model(**to_device(inputs, device), **extra)
            except _Captured:
                pass
        handle.remove()
        if len(captured) != len(items):
            raise SensiloraError(
                "the first decoder layer did not run for every calibration batch; calibrate without sequential"
            )
        for layer in layers:
            layer_home = next(layer.parameters()).device
            layer.to(device)
            for index, ((args, kwargs), (item, _)) in enumerate(zip(captured, items)):
                with observer.batch(item.mask, item.real_tokens):
                    output = layer(*args, **kwargs)
                hidden = output[0] if isinstance(output, (tuple, list)) else output
                captured[index] = ((hidden, *args[1:]), kwargs) if args else ((), {**kwargs, "hidden_states": hidden})
                observer.check_finite(item.index)
            layer.to(layer_home)
    finally:
        handle.remove()
        _move(outside, homes)
