"""The loss gradient of every target weight averaged over the calibration batches: the statistic of the
gradient rules (``AllocationConfig(rule="gora")`` and ``rule="gradient-spectrum"``, METHOD.md section 4b).

One forward and backward pass a batch with only the target weights requiring a gradient (every flag restored
after); the gradients are summed in fp32 and divided by the number of batches. Memory: one fp32 matrix per
target, as a training step's weight gradients (GoRA keeps the same).
"""

from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm

from ..errors import SensiloraError
from .models import with_loss_labels
from .pipelines import forward_kwargs
from .targets import TargetSpec, find_targets, linear_shape, stores_weight_transposed


def mean_gradients(
    model: nn.Module, batches, target_modules: TargetSpec = None, progress: bool = False
) -> dict[str, torch.Tensor]:
    """{name: (d_out, d_in) fp32 mean of dL/dW over ``batches``} for every target (``find_targets``).
    ``batches``: dicts of tensors as ``calibrate`` takes them (with ``labels``, or a causal LM's inputs)."""
    batches = list(batches)
    if not batches:
        raise SensiloraError("mean_gradients got no calibration batches; give at least one")
    targets = find_targets(model, target_modules)
    device = next(model.parameters()).device
    flags = {parameter: parameter.requires_grad for parameter in model.parameters()}
    sums = {
        name: torch.zeros(linear_shape(module), dtype=torch.float32, device=device) for name, module in targets.items()
    }
    training = model.training
    try:
        model.eval()  # no dropout: the gradient of the model as it will start training
        for parameter in flags:
            parameter.requires_grad_(False)
        for module in targets.values():
            module.weight.requires_grad_(True)
            module.weight.grad = None
        for batch in tqdm(batches, desc="gradients", disable=not progress):
            batch = with_loss_labels(model, batch, "rule='gora' or 'gradient-spectrum'")
            inputs = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
            with torch.enable_grad():
                loss = model(**inputs, **forward_kwargs(model, logits=True)).loss
                if loss is None or not torch.isfinite(loss):
                    raise SensiloraError(f"{type(model).__name__} gave no finite loss on a calibration batch")
                loss.backward()
            for name, module in targets.items():  # a Conv1D's weight (and gradient) is stored (d_in, d_out)
                gradient = module.weight.grad.T if stores_weight_transposed(module) else module.weight.grad
                sums[name] += gradient.float()
                module.weight.grad = None
    finally:
        for parameter, flag in flags.items():
            parameter.requires_grad_(flag)
        model.train(training)
    return {name: total / len(batches) for name, total in sums.items()}
