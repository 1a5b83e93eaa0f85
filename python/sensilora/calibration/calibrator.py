"""``calibrate``: the composition of an observer (what is measured), a pipeline (how batches reach the
layers) and the lifecycle around them (METHOD.md section 1)."""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from .. import ops
from ..errors import SensiloraError
from .batches import BatchSource
from .lifecycle import Checkpointing, checkpoint_settings, finish, observing, provenance
from .observers import Observer, observer_class
from .pipelines import WholeModel, build_pipeline, pipeline_class
from .stats import SensitivityStats
from .targets import TargetSpec, check_weights_finite, find_targets, linear_shape, unadapted_experts_note


def check_calibration_options(
    mode: str,
    statistic: str,
    exclude_first: int,
    sequential: bool,
    checkpoint: object = None,
    checkpoint_every=50,
    device: object = None,
    keep_grams: bool = False,
) -> tuple[type[Observer], type[WholeModel]]:
    """The checks of ``calibrate``'s options that need neither model nor data (the CLI runs them before
    loading); returns the observer and pipeline classes they select. What the parts cannot do, they refuse
    themselves (``observer_class``, ``pipeline.check``, their capabilities)."""
    observer = observer_class(mode, statistic)
    pipeline = pipeline_class(sequential)
    pipeline.check(observer, device)
    if isinstance(exclude_first, bool) or not isinstance(exclude_first, int) or exclude_first < 0:
        raise SensiloraError(f"exclude_first must be a non-negative integer, got {exclude_first!r}")
    if keep_grams and not observer.keeps_grams:
        raise SensiloraError("keep_grams keeps obs mode's X^T X; diag statistics merge without it: use mode='obs'")
    if checkpoint is not None and not pipeline.resumable:
        raise SensiloraError("checkpoints save sums between batches; sequential mode runs layer by layer: drop one")
    if isinstance(checkpoint_every, bool) or not isinstance(checkpoint_every, int) or checkpoint_every < 1:
        raise SensiloraError(f"checkpoint_every must be a positive number of batches, got {checkpoint_every!r}")
    return observer, pipeline


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
    remove_checkpoint: bool = True,
) -> SensitivityStats:
    """Run the calibration passes and return the per-module statistics (METHOD.md section 1).

    batches: a DataLoader, an iterable of dicts (``input_ids``, ``attention_mask``, ``labels``, ...),
    input_ids tensors (B, T), or one of these alone. Padding (``attention_mask == 0``) is excluded.
    mode: ``"diag"`` (the paper: per-column sums of squared activations) or ``"obs"`` (full ``X^T X``
    per distinct input, then the damped inverse diagonal). statistic: ``"hessian"`` (the layer-wise
    Hessian proxy, forward passes only, no autograd graph), ``"fisher"`` (diag mode: squared activations
    weighted per token by the squared output-gradient norm of the model's loss; one backward pass a batch)
    ``"hessian-robust"`` (diag mode: the Hessian diagonal over each input's tokens whose activation norm
    is within 10x the median token's, dropping massive activations; METHOD.md section 1d) or
    ``"hessian-clipped"`` (diag mode: every token kept, its activation norm clipped at 10x the median's).
    exclude_first: leave out the first k real tokens of every sequence (0: every token, exact).
    sequential: run the decoder layers one at a time on ``device`` (default: CUDA if present), the model
    staying where it is: for models larger than the device (``pipelines.LayerSequential``).
    checkpoint: a file to save the running sums in every ``checkpoint_every`` batches and to resume from
    when it exists (same batches, same settings; ``checkpoint.py``); removed when calibration finishes
    unless ``remove_checkpoint=False`` (the CLI removes it only once its outputs are written).
    keep_grams: obs mode, keep each input's Hessian ``(2/N) X^T X`` (d_in x d_in fp32) in the result, so
    that statistics of separate runs can be merged exactly (``merge_statistics``); costs their memory.
    Sums are fp32 whatever the model dtype; hooks are removed and train/eval and requires_grad flags
    restored even on error.
    """
    kind, _ = check_calibration_options(
        mode, statistic, exclude_first, sequential, checkpoint, checkpoint_every, device, keep_grams
    )
    ops.load_backends()
    targets = find_targets(model, target_modules)
    check_weights_finite(targets)
    experts = unadapted_experts_note(model) if target_modules is None else None
    if experts:
        warnings.warn(experts, stacklevel=2)
    pipeline = build_pipeline(model, targets, sequential, device)
    observer = kind({name: linear_shape(module) for name, module in targets.items()})
    source = BatchSource(batches, exclude_first, progress, f"calibrating ({mode})")
    saving = None
    if checkpoint is not None:
        settings = checkpoint_settings(observer, exclude_first, targets, model)
        saving = Checkpointing(checkpoint, checkpoint_every, settings, progress)
        saving.resume(observer, source, pipeline.accumulator_devices(targets))
    started = time.perf_counter()
    with observing(model, observer, targets):
        pipeline.run(source, observer, lambda: saving and saving.after_batch(observer, source))
    seen, inputs = finish(observer, source, targets, damp, keep_grams, target_modules is None)
    if saving is not None and remove_checkpoint:
        saving.remove()
    info = provenance(
        model, source, seen, next(iter(observer.accumulators.values())).num_tokens, time.perf_counter() - started,
        damp=damp, statistic=statistic, exclude_first=exclude_first,
    )  # fmt: skip
    return SensitivityStats(
        mode=mode,
        module_shapes=dict(observer.shapes),
        module_inputs={name: observer.by_module[name].key for name in targets},
        inputs=inputs,
        model_name=model_name or getattr(getattr(model, "config", None), "_name_or_path", None) or type(model).__name__,
        info=info,
    )
