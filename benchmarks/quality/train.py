"""One fine-tuning run: a method's peft model, a seeded data order, the task metric, step time, memory."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch


@dataclass
class RunResult:
    method: str
    seed: int
    metrics: dict
    trainable_parameters: int
    step_seconds: float
    peak_memory_gib: float | None
    curve: dict  # {step: metrics} at the checkpoints
    parameters: dict = field(default_factory=dict)  # {"adapter": final adapter, "hypernetwork": ...}
    update_norms: dict = field(default_factory=dict)  # {module: ||Delta W||_F at the end} (LoRA layers)


def update_norms(peft_model, adapter: str = "default") -> dict[str, float]:
    """``||Delta W||_F`` (the scaled ``B A``) of every LoRA layer, by the base model's module name: how far
    training moved each matrix, so step-size effects of heterogeneous ranks are visible. Empty for a model
    without peft LoRA layers."""
    from peft.tuners.lora import LoraLayer

    prefix = "base_model.model."
    with torch.no_grad():
        return {
            name.removeprefix(prefix): float(module.get_delta_weight(adapter).float().norm())
            for name, module in peft_model.named_modules()
            if isinstance(module, LoraLayer)
            and adapter in getattr(module, "r", {})
            and hasattr(module, "get_delta_weight")
        }


def reset_peak_rss() -> bool:
    """Reset this process's peak resident set size (Linux: writing 5 to /proc/self/clear_refs)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss_gib() -> float | None:
    """Peak resident set size since the last reset (VmHWM), in GiB; None where unavailable."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return None


def macro_f1(predictions: np.ndarray, labels: np.ndarray, classes: int) -> float:
    scores = []
    for c in range(classes):
        tp = np.sum((predictions == c) & (labels == c))
        fp = np.sum((predictions == c) & (labels != c))
        fn = np.sum((predictions != c) & (labels == c))
        scores.append(0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn))
    return float(np.mean(scores))


def train(
    peft_model,
    batches_for_epoch,
    steps: int,
    lr: float,
    seed: int,
    on_step=None,
    evaluate=None,
    checkpoints=(),
    warmup: float = 0.1,
    loss_fn=None,
) -> tuple[float, float | None, dict[int, dict]]:
    """AdamW over ``steps`` batches in the seed's order, learning rate warmed up linearly over the first
    ``warmup`` fraction of the steps then decayed linearly to 0; ``evaluate()`` (a metrics dict) runs
    after each step in ``checkpoints``. ``loss_fn(model, batch)`` replaces the model's own ``.loss`` where
    given (distillation). Returns (median step seconds, peak memory GiB, {step: metrics}).

    Peak memory: GPU memory allocated on CUDA; on the CPU the process's peak resident set during
    training (base model included, so only differences between methods are meaningful), or None."""
    torch.manual_seed(seed)
    parameters = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=lr)
    warm = max(1, int(warmup * steps))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: (step + 1) / warm if step < warm else max(0.0, (steps - step) / max(1, steps - warm))
    )
    device = parameters[0].device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    cpu_peak = device.type == "cpu" and reset_peak_rss()
    generator = torch.Generator().manual_seed(seed)
    times, step, curve = [], 0, {}
    while step < steps:
        for batch in batches_for_epoch(generator):
            peft_model.train()
            start = time.perf_counter()
            batch = {k: v.to(device) for k, v in batch.items()}
            loss = peft_model(**batch).loss if loss_fn is None else loss_fn(peft_model, batch)
            loss.backward()
            optimizer.step()
            schedule.step()
            if on_step is not None:
                on_step(step)
            optimizer.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - start)
            step += 1
            if evaluate is not None and step in checkpoints:
                peft_model.eval()
                with torch.no_grad():
                    curve[step] = {**evaluate(), "seconds": float(np.sum(times))}
            if step == steps:
                break
    peak = (
        torch.cuda.max_memory_allocated(device) / 2**30
        if device.type == "cuda"
        else (peak_rss_gib() if cpu_peak else None)
    )
    return float(np.median(times)), peak, curve


def trainable_targets(model, targets, seed: int) -> dict[str, torch.nn.Module]:
    """Freeze ``model`` but the target weights (and a classification head, re-initialised with ``seed``)."""
    modules = dict(model.named_modules())
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    for name in targets:
        modules[name].weight.requires_grad_(True)
    if hasattr(model, "classifier"):
        torch.manual_seed(seed)
        model.classifier.reset_parameters()
        model.classifier.requires_grad_(True)
    return {name: modules[name] for name in targets}


def train_teacher(setup, steps: int, lr: float, seed: int) -> tuple[dict[str, torch.Tensor], dict]:
    """Full fine-tuning of the target matrices of ``setup`` (a quality task); returns ({name: Delta W
    (d_out, d_in) fp32}, its record: seed, step seconds and the test metrics at the end)."""
    import copy

    model = copy.deepcopy(setup.base)
    modules = trainable_targets(model, setup.targets, seed)
    before = {name: module.weight.detach().clone() for name, module in modules.items()}
    evaluate = setup.evaluators["test"](model)
    step_s, _, curve = train(model, setup.epoch, steps, lr, seed, evaluate=evaluate, checkpoints=(steps,),
                             loss_fn=setup.loss)  # fmt: skip
    deltas = {name: (module.weight.detach() - before[name]).float() for name, module in modules.items()}
    return deltas, {"seed": seed, "step_s": step_s, **curve[steps]}
