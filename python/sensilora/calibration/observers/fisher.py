"""The loss-aware statistic (``calibrate(..., statistic="fisher")``, METHOD.md section 1b).

The Gauss-Newton/Fisher diagonal of a linear layer's weight, ``F_ij = sum_n (dL/dy_ni)^2 x_nj^2``, summed
over the output rows i as every metric does, is ``sum_n ||dL/dy_n||^2 x_nj^2``: the squared activations of
each token weighted by the squared norm of the loss gradient at that token's output. One backward pass per
batch gives the gradients; no weight gradient is computed or kept (every parameter's ``requires_grad`` is
off for the pass and restored after). Unlike the Hessian proxy ``X^T X`` it sees the task's loss, so
tokens the model already predicts well (the attention sink, most padding-like tokens) weigh little.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from ...errors import SensiloraError
from ..models import with_loss_labels
from .base import ColumnSumsq, Observer


class FisherDiagonal(Observer):
    """diag mode, loss-aware: per-token weights ``||dL/dy||^2`` fused into the column sums (no scaled copy
    of x). Needs the loss (labels; a causal LM predicts its input) and one backward pass a batch; weighted
    inputs never share an accumulator (each module carries its own output gradients)."""

    mode = "diag"
    statistic = "fisher"
    accumulator = ColumnSumsq
    needs_backward = True
    needs_logits = True
    shares_inputs = False

    def attach(self, targets: dict[str, nn.Module]) -> list:
        """Forward hooks that, during the backward pass, hand ``observe(name, x, ||dL/dy||^2)`` (one weight
        per token) to the accumulators."""

        def hook(name: str):
            def on_forward(_module, args, output):
                x = args[0].detach()

                def on_output_gradient(gradient: torch.Tensor) -> None:
                    self.observe(name, x, gradient.float().square().sum(-1))

                if output.requires_grad:
                    output.register_hook(on_output_gradient)

            return on_forward

        return [module.register_forward_hook(hook(name)) for name, module in targets.items()]

    @contextlib.contextmanager
    def passes(self, model: nn.Module) -> Iterator[None]:
        """Inside: parameters need no gradient, the input embeddings' output does (so gradients flow through
        the activations only), wherever a module embeds with their weight. Both restored on exit."""
        embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
        if embeddings is None:
            raise SensiloraError(
                f"statistic='fisher' needs the input embeddings of {type(model).__name__} (get_input_embeddings)"
            )
        flags = {parameter: parameter.requires_grad for parameter in model.parameters()}
        # every module that embeds with the input embeddings' weight: an encoder-decoder's stacks (T5, BART)
        # each hold their own embedding module tied to the shared one, and only those run
        tied = [module for module in model.modules() if getattr(module, "weight", None) is embeddings.weight]
        handles = [
            module.register_forward_hook(lambda _module, _args, output: output.requires_grad_(True)) for module in tied
        ]
        try:
            for parameter in flags:
                parameter.requires_grad_(False)
            yield
        finally:
            for handle in handles:
                handle.remove()
            for parameter, flag in flags.items():
                parameter.requires_grad_(flag)

    def prepare(self, model: nn.Module, batch: dict[str, Any]) -> dict[str, Any]:
        """The batch with ``labels`` for the model's own loss: given ones are kept; a causal LM predicts its
        input (padding set to -100); other models need labels in the calibration batches."""
        return with_loss_labels(model, batch, "statistic='fisher'")

    def forward(self, model: nn.Module, inputs: dict[str, Any], extra: dict[str, Any]) -> None:
        """Forward with labels, then backward from the model's loss (the hooks collect on the way back)."""
        with torch.enable_grad():
            output = model(**inputs, **extra)
            loss = getattr(output, "loss", None)
            if loss is None:
                raise SensiloraError(
                    f"{type(model).__name__} returned no loss for the calibration batch; give 'labels'"
                )
            loss.backward()
