"""Calibration: forward hooks that stream Hessian statistics out of a few forward passes (METHOD.md section 1)."""

from __future__ import annotations

import inspect
import math
import time
import weakref
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from . import fisher, ops
from .batches import DataFingerprint, iterate_batches, model_config_hash, model_inputs, sequence_start_mask
from .distributed import reduce_statistics
from .errors import SensiloraError
from .stats import MODES, InputStats, SensitivityStats
from .targets import TargetSpec, check_weights_finite, find_targets, linear_shape

Batch = Mapping[str, torch.Tensor]
# Hessians of one size are inverted together up to this many bytes of fp32 d x d matrices at a time: the
# inversion's temporaries (a copy, the factor, its inverse) are a few chunks, whatever the model's size
# (LLaMA-3.1-8B: two 14336 x 14336 grams, or 32 of 4096 x 4096, a chunk).
INVERSE_CHUNK_BYTES = 2**31
STATISTICS = ("hessian", "fisher")


class _Accumulator:
    """Running fp32 sums for one distinct input tensor (shared by the modules that read it)."""

    def __init__(self, key: str, d_in: int, device: torch.device, mode: str):
        self.key = key
        self.mode = mode
        self.sumsq = torch.zeros(d_in, dtype=torch.float32, device=device) if mode == "diag" else None
        self.gram = torch.zeros(d_in, d_in, dtype=torch.float32, device=device) if mode == "obs" else None
        self.num_tokens = 0
        self.last_input: weakref.ref | None = None

    def add(self, x: torch.Tensor, mask: torch.Tensor | None, num_tokens: int) -> None:
        if self.mode == "diag":
            ops.column_sumsq_(self.sumsq, x, mask)
        else:
            ops.gram_(self.gram, x, mask)
        self.num_tokens += num_tokens
        self.last_input = weakref.ref(x)

    def column_sums(self) -> torch.Tensor:
        return self.sumsq if self.mode == "diag" else self.gram.diagonal()


class _Collector:
    """State shared by the hooks of one calibration run."""

    def __init__(self, mode: str, shapes: dict[str, tuple[int, int]]):
        self.mode = mode
        self.shapes = shapes
        self.by_module: dict[str, _Accumulator] = {}
        self.accumulators: dict[str, _Accumulator] = {}
        self.mask: torch.Tensor | None = None
        self.real_tokens = 0
        self._mask_on: dict[torch.device, torch.Tensor] = {}

    def start_batch(self, mask: torch.Tensor | None, real_tokens: int) -> None:
        self.mask = mask
        self.real_tokens = real_tokens
        self._mask_on = {}

    def _mask_for(self, name: str, x: torch.Tensor) -> tuple[torch.Tensor | None, int]:
        lead = tuple(x.shape[:-1])
        if self.mask is None:
            return None, math.prod(lead)
        # The input's token axes must be the mask's (batch, seq), or those flattened batch-major: an equal
        # element count is not enough (a sequence-first (seq, batch, d) input would be masked transposed).
        if lead != tuple(self.mask.shape) and lead != (self.mask.numel(),):
            raise SensiloraError(
                f"module {name!r} received inputs with token axes {lead} but the batch's attention_mask has shape "
                f"{tuple(self.mask.shape)}; sensilora needs batch-first inputs with one row per token (sequence-first, "
                "packed or variable-length inputs are not supported): pass padded batch-first batches with their "
                "attention_mask"
            )
        if x.device not in self._mask_on:
            self._mask_on[x.device] = self.mask.to(x.device)
        return self._mask_on[x.device].reshape(lead), self.real_tokens

    def observe(self, name: str, x: torch.Tensor) -> None:
        accumulator = self.by_module.get(name)
        if accumulator is None:  # first batch: share with a module that read this very tensor
            shared = next(
                (a for a in self.accumulators.values() if a.last_input is not None and a.last_input() is x), None
            )
            if shared is not None:
                self.by_module[name] = shared
                return
            accumulator = _Accumulator(name, self.shapes[name][1], x.device, self.mode)
            self.accumulators[name] = self.by_module[name] = accumulator
        elif accumulator.key != name:
            if accumulator.last_input is None or accumulator.last_input() is not x:
                raise SensiloraError(
                    f"module {name!r} shared its input with {accumulator.key!r} in the first batch but not "
                    "later; calibrate this model with target_modules naming only one of them"
                )
            return
        if not torch.is_floating_point(x):
            raise SensiloraError(f"module {name!r} received a {x.dtype} input; expected floating point activations")
        mask, tokens = self._mask_for(name, x)
        accumulator.add(x, mask, tokens)

    def check_finite(self, batch_index: int) -> None:
        accumulators = list(self.accumulators.values())
        device = accumulators[0].column_sums().device
        totals = torch.stack([a.column_sums().sum().to(device) for a in accumulators])  # one sync per batch
        if bool(torch.isfinite(totals).all()):
            return
        bad = next(a for a, t in zip(accumulators, totals.tolist()) if not math.isfinite(t))
        readers = [n for n, a in self.by_module.items() if a is bad]
        raise SensiloraError(
            f"non-finite (NaN/Inf) activations entering module(s) {readers} in calibration batch {batch_index}; "
            "the model overflows in this dtype on this text (or a weight outside the target modules is NaN/Inf): "
            "calibrate in float32/bfloat16 or drop that batch"
        )


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


def _finish(collector: _Collector, damp: float) -> dict[str, InputStats]:
    """Scale sums by 2/N; in obs mode also invert the damped Hessians, equal sizes batched."""
    results: dict[str, InputStats] = {}
    for key, accumulator in collector.accumulators.items():
        if accumulator.num_tokens == 0:
            raise SensiloraError(f"module {key!r} saw no real tokens during calibration; check the model's forward")
        scale = 2.0 / accumulator.num_tokens
        results[key] = InputStats(
            hessian_diag=(accumulator.column_sums() * scale).clone(), num_tokens=accumulator.num_tokens
        )
    if collector.mode == "obs":
        by_size: dict[tuple, list[_Accumulator]] = {}
        for accumulator in collector.accumulators.values():
            by_size.setdefault((accumulator.gram.shape[0], accumulator.gram.device), []).append(accumulator)
        for (size, _), group in by_size.items():
            per_chunk = max(1, INVERSE_CHUNK_BYTES // (size * size * 4))
            for start in range(0, len(group), per_chunk):
                chunk = group[start : start + per_chunk]
                for a in chunk:
                    a.gram.mul_(2.0 / a.num_tokens)  # H = (2/N) X^T X, in place
                hessians = torch.stack([a.gram for a in chunk])
                for a in chunk:  # only the stacked copy is left: each gram is freed as its inverse is taken
                    a.gram = None
                inverse, damps = ops.inverse_diagonal(hessians, damp)
                del hessians
                for a, inv, used in zip(chunk, inverse, damps.tolist()):
                    results[a.key].inverse_hessian_diag = inv.clone()
                    results[a.key].damp = used
    return results


def calibrate(
    model: nn.Module,
    batches: Iterable[Any] | torch.Tensor | Mapping,
    mode: str = "diag",
    target_modules: TargetSpec = None,
    *,
    statistic: str = "hessian",
    exclude_first: int = 0,
    damp: float = 0.01,
    progress: bool = True,
    model_name: str | None = None,
) -> SensitivityStats:
    """Run the calibration passes and return the per-module statistics (METHOD.md section 1).

    batches: a DataLoader, an iterable of dicts (``input_ids``, ``attention_mask``, ``labels``, ...),
    input_ids tensors (B, T), or one of these alone. Padding (``attention_mask == 0``) is excluded.
    mode: ``"diag"`` (the paper: per-column sums of squared activations) or ``"obs"`` (full ``X^T X``
    per distinct input, then the damped inverse diagonal). statistic: ``"hessian"`` (the layer-wise
    Hessian proxy, forward passes only, no autograd graph) or ``"fisher"`` (diag mode: squared activations
    weighted per token by the squared output-gradient norm of the model's loss; one backward pass a batch).
    exclude_first: leave out the first k real tokens of every sequence (0: every token, exact).
    Sums are fp32 whatever the model dtype; hooks are removed and train/eval and requires_grad flags
    restored even on error.
    """
    if mode not in MODES:
        raise SensiloraError(f"mode must be one of {MODES}, got {mode!r}")
    if statistic not in STATISTICS:
        raise SensiloraError(f"statistic must be one of {STATISTICS}, got {statistic!r}")
    if statistic == "fisher" and mode != "diag":
        raise SensiloraError("statistic='fisher' is a diagonal statistic: use it with mode='diag'")
    if isinstance(exclude_first, bool) or not isinstance(exclude_first, int) or exclude_first < 0:
        raise SensiloraError(f"exclude_first must be a non-negative integer, got {exclude_first!r}")
    ops.load_backends()
    targets = find_targets(model, target_modules)
    check_weights_finite(targets)
    collector = _Collector(mode, {name: linear_shape(module) for name, module in targets.items()})
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
    device = next(model.parameters()).device
    total = len(batches) if hasattr(batches, "__len__") and not isinstance(batches, (torch.Tensor, Mapping)) else None
    started = time.perf_counter()
    seen_batches = 0
    fingerprint = DataFingerprint()
    try:
        model.eval()
        with passes:
            for index, batch in enumerate(
                tqdm(iterate_batches(batches), total=total, desc=f"calibrating ({mode})", disable=not progress)
            ):
                seen_batches += 1
                fingerprint.add(batch)
                mask = batch.get("attention_mask")
                if exclude_first:
                    mask = torch.ones(batch["input_ids"].shape, dtype=torch.bool) if mask is None else mask
                    mask = sequence_start_mask(mask.bool(), exclude_first)
                if mask is not None:
                    mask = mask.bool()
                    real = int(mask.sum())
                    if real == 0:
                        continue
                else:
                    real = int(batch["input_ids"].numel()) if "input_ids" in batch else 0
                collector.start_batch(mask, real)
                if statistic == "fisher":
                    batch = fisher.with_labels(model, batch)
                else:
                    batch = {k: v for k, v in batch.items() if k != "labels"}
                inputs = {
                    k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in model_inputs(model, batch).items()
                }
                if statistic == "fisher":
                    fisher.backward_pass(model, inputs, extra)
                else:
                    model(**inputs, **extra)
                if not collector.accumulators:
                    raise SensiloraError(
                        "no target module ran during the forward pass; check target_modules and the batch keys"
                    )
                collector.check_finite(index)
    finally:
        for handle in handles:
            handle.remove()
        for module, flag in training_flags.items():
            module.training = flag
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
    inputs = _finish(collector, damp)
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
