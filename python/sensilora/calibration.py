"""Calibration: forward hooks that stream Hessian statistics out of a few forward passes (METHOD.md section 1)."""

from __future__ import annotations

import inspect
import os
import time
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from . import fisher, ops
from .batches import (
    DataFingerprint,
    input_device,
    iterate_batches,
    model_config_hash,
    model_inputs,
    sequence_start_mask,
    to_device,
)
from .checkpoint import CalibrationCheckpoint, check_resumed_data
from .collector import Collector
from .distributed import distributed_rank, process_group_size, reduce_statistics
from .errors import SensiloraError
from .inverse import inverse_diagonals
from .sequential import decoder_layers, run_sequentially
from .stats import MODES, InputStats, SensitivityStats
from .targets import TargetSpec, check_weights_finite, find_targets, linear_shape

Batch = Mapping[str, torch.Tensor]
STATISTICS = ("hessian", "fisher")


def _default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


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


def _finish(collector: Collector, damp: float, keep_grams: bool = False) -> dict[str, InputStats]:
    """Scale sums by 2/N; in obs mode also invert the damped Hessians (``inverse.inverse_diagonals``),
    freeing each gram once inverted unless ``keep_grams`` keeps it (scaled) in the result for merging."""
    results: dict[str, InputStats] = {}
    for key, accumulator in collector.accumulators.items():
        if accumulator.num_tokens == 0:
            raise SensiloraError(f"module {key!r} saw no real tokens during calibration; check the model's forward")
        scale = 2.0 / accumulator.num_tokens
        results[key] = InputStats(
            hessian_diag=(accumulator.column_sums() * scale).clone(), num_tokens=accumulator.num_tokens
        )
    if collector.mode == "obs":
        hessians = {}
        for key, accumulator in collector.accumulators.items():
            hessians[key] = accumulator.gram.mul_(2.0 / accumulator.num_tokens)  # H = (2/N) X^T X, in place
            accumulator.gram = None  # the dict holds the last reference: freed once stacked for inversion
            if keep_grams:
                results[key].hessian = hessians[key]
        for key, (diagonal, used) in inverse_diagonals(hessians, damp).items():
            results[key].inverse_hessian_diag, results[key].damp = diagonal, used
    return results


def check_calibration_options(
    mode: str,
    statistic: str,
    exclude_first: int,
    sequential: bool,
    checkpoint: object = None,
    checkpoint_every=50,
    device: object = None,
    keep_grams: bool = False,
) -> None:
    """The checks of ``calibrate``'s options that need neither model nor data (the CLI runs them before loading)."""
    if mode not in MODES:
        raise SensiloraError(f"mode must be one of {MODES}, got {mode!r}")
    if statistic not in STATISTICS:
        raise SensiloraError(f"statistic must be one of {STATISTICS}, got {statistic!r}")
    if statistic == "fisher" and mode != "diag":
        raise SensiloraError("statistic='fisher' is a diagonal statistic: use it with mode='diag'")
    if sequential and statistic == "fisher":
        raise SensiloraError("statistic='fisher' needs a backward pass through the whole model: use sequential=False")
    if isinstance(exclude_first, bool) or not isinstance(exclude_first, int) or exclude_first < 0:
        raise SensiloraError(f"exclude_first must be a non-negative integer, got {exclude_first!r}")
    if sequential and str(device) == "auto":
        raise SensiloraError("sequential mode moves one layer at a time to one device: give --device cuda (or cpu)")
    if keep_grams and mode != "obs":
        raise SensiloraError("keep_grams keeps obs mode's X^T X; diag statistics merge without it: use mode='obs'")
    if checkpoint is not None and sequential:
        raise SensiloraError("checkpoints save sums between batches; sequential mode runs layer by layer: drop one")
    if isinstance(checkpoint_every, bool) or not isinstance(checkpoint_every, int) or checkpoint_every < 1:
        raise SensiloraError(f"checkpoint_every must be a positive number of batches, got {checkpoint_every!r}")


def calibrate(
    model: nn.Module,
    batches: Iterable[Any] | torch.Tensor | Mapping,
    mode: str = "diag",
    target_modules: TargetSpec = None,
    *,
    statistic: str = "hessian",
    exclude_first: int = 0,
    damp: float = 0.01,
    sequential: bool = False,
    device: str | torch.device | None = None,
    progress: bool = True,
    model_name: str | None = None,
    checkpoint: str | os.PathLike | None = None,
    checkpoint_every: int = 50,
    keep_grams: bool = False,
) -> SensitivityStats:
    """Run the calibration passes and return the per-module statistics (METHOD.md section 1).

    batches: a DataLoader, an iterable of dicts (``input_ids``, ``attention_mask``, ``labels``, ...),
    input_ids tensors (B, T), or one of these alone. Padding (``attention_mask == 0``) is excluded.
    mode: ``"diag"`` (the paper: per-column sums of squared activations) or ``"obs"`` (full ``X^T X``
    per distinct input, then the damped inverse diagonal). statistic: ``"hessian"`` (the layer-wise
    Hessian proxy, forward passes only, no autograd graph) or ``"fisher"`` (diag mode: squared activations
    weighted per token by the squared output-gradient norm of the model's loss; one backward pass a batch).
    exclude_first: leave out the first k real tokens of every sequence (0: every token, exact).
    sequential: run the decoder layers one at a time on ``device`` (default: CUDA if present), the model
    staying where it is: for models larger than the device (see ``sequential.run_sequentially``).
    checkpoint: a file to save the running sums in every ``checkpoint_every`` batches and to resume from
    when it exists (same batches, same settings; ``checkpoint.py``); removed when calibration finishes.
    keep_grams: obs mode, keep each input's Hessian ``(2/N) X^T X`` (d_in x d_in fp32) in the result, so
    that statistics of separate runs can be merged exactly (``merge_statistics``); costs their memory.
    Sums are fp32 whatever the model dtype; hooks are removed and train/eval and requires_grad flags
    restored even on error.
    """
    check_calibration_options(
        mode, statistic, exclude_first, sequential, checkpoint, checkpoint_every, device, keep_grams
    )
    ops.load_backends()
    targets = find_targets(model, target_modules)
    check_weights_finite(targets)
    collector = Collector(mode, {name: linear_shape(module) for name, module in targets.items()})
    training_flags = {module: module.training for module in model.modules()}
    if statistic == "fisher":
        handles = fisher.output_gradient_hooks(targets, collector.observe)
        passes = fisher.activation_gradients_only(model)
    else:
        handles = [
            module.register_forward_pre_hook(lambda _module, args, _name=name: collector.observe(_name, args[0]))
            for name, module in targets.items()
        ]
        passes = torch.no_grad()
    extra = forward_kwargs(model, logits=statistic == "fisher")
    model_device = input_device(model)
    total = len(batches) if hasattr(batches, "__len__") and not isinstance(batches, (torch.Tensor, Mapping)) else None
    started = time.perf_counter()
    seen_batches = 0
    fingerprint = DataFingerprint()
    saver, resume_at, resume_fingerprint = None, 0, None
    if checkpoint is not None:
        saver = CalibrationCheckpoint(checkpoint, checkpoint_every, {
            "mode": mode, "statistic": statistic, "exclude_first": exclude_first, "targets": sorted(targets),
            "model_config_sha256": model_config_hash(model), "world": [distributed_rank(), process_group_size()],
        })  # fmt: skip
        devices = {n: m.weight.device if m.weight.device.type != "meta" else model_device for n, m in targets.items()}
        resume_at, resume_fingerprint = saver.restore(collector, devices)

    def prepare(batch):  # -> (statistics mask or None, real tokens, forward inputs) or None for all padding
        fingerprint.add(batch)
        mask = batch.get("attention_mask")
        if exclude_first:
            mask = torch.ones(batch["input_ids"].shape, dtype=torch.bool) if mask is None else mask
            mask = sequence_start_mask(mask.bool(), exclude_first)
        if mask is not None:
            mask = mask.bool()
            real = int(mask.sum())
            if real == 0:
                return None
        else:
            real = int(batch["input_ids"].numel()) if "input_ids" in batch else 0
        batch = (
            fisher.with_labels(model, batch)
            if statistic == "fisher"
            else {k: v for k, v in batch.items() if k != "labels"}
        )
        return mask, real, model_inputs(model, batch)

    try:
        model.eval()
        with passes:
            stream = tqdm(iterate_batches(batches), total=total, desc=f"calibrating ({mode})", disable=not progress)
            if sequential:
                prepared = list(map(prepare, stream))
                seen_batches = len(prepared)  # all-padding batches count as seen, as in the ordinary mode
                ready = [item for item in prepared if item is not None]
                _, layers = decoder_layers(model, targets)
                run_sequentially(
                    model, layers, [inputs for _, _, inputs in ready], torch.device(device or _default_device()),
                    lambda i: collector.start_batch(*ready[i][:2]), collector.check_finite, extra,
                )  # fmt: skip
            for index, batch in enumerate(() if sequential else stream):
                seen_batches += 1
                if seen_batches <= resume_at:  # summed before the checkpoint: hashed to prove it is the same data
                    fingerprint.add(batch)
                    if seen_batches == resume_at:
                        check_resumed_data(fingerprint, resume_fingerprint, checkpoint)
                    continue
                item = prepare(batch)
                if item is None:
                    continue
                collector.start_batch(*item[:2])
                inputs = to_device(item[2], model_device)
                if statistic == "fisher":
                    fisher.backward_pass(model, inputs, extra)
                else:
                    model(**inputs, **extra)
                if not collector.accumulators:
                    raise SensiloraError(
                        "no target module ran during the forward pass; check target_modules and the batch keys"
                    )
                collector.check_finite(index)
                if saver is not None and saver.due(seen_batches):
                    saver.save(collector, seen_batches, fingerprint.hexdigest())
    finally:
        for handle in handles:
            handle.remove()
        for module, flag in training_flags.items():
            module.training = flag
    if seen_batches < resume_at:
        raise SensiloraError(
            f"the calibration data has {seen_batches} batches but checkpoint {checkpoint} already summed {resume_at}: "
            "resume with the same data, or delete the checkpoint to start afresh"
        )
    seen_batches = reduce_statistics(collector, seen_batches)  # across the process group, if there is one
    if seen_batches == 0:
        raise SensiloraError("the calibration set is empty: give at least one batch of text")
    if not collector.accumulators:
        raise SensiloraError(
            "every calibration batch was all padding (attention_mask == 0): give batches with real tokens"
        )
    missing = [name for name in targets if name not in collector.by_module]
    if missing:
        raise SensiloraError(
            f"target modules never ran during calibration: {missing[:5]}; exclude them with target_modules"
        )
    inputs = _finish(collector, damp, keep_grams)
    if saver is not None:
        saver.remove()
    elapsed = time.perf_counter() - started
    first = next(iter(collector.accumulators.values()))
    return SensitivityStats(
        mode=mode,
        module_shapes=dict(collector.shapes),
        module_inputs={name: collector.by_module[name].key for name in targets},
        inputs=inputs,
        model_name=model_name or getattr(getattr(model, "config", None), "_name_or_path", None) or type(model).__name__,
        info={
            "batches": seen_batches,
            "tokens": first.num_tokens,
            "seconds": round(elapsed, 3),
            "damp": damp,
            "statistic": statistic,
            "exclude_first": exclude_first,
            "data_sha256": fingerprint.hexdigest(),
            "model_config_sha256": model_config_hash(model),
        },
    )
