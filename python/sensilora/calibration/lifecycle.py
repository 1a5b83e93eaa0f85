"""What happens around the calibration loop, whatever the pipeline and the observer: the model's state
(hooks in, flags restored), checkpoint and resume, the reduction across a process group, the end checks
and the provenance recorded with the result."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
from collections.abc import Iterator

from torch import nn

from ..errors import SensiloraError
from .batches import BatchSource, combined_fingerprint
from .checkpoint import CalibrationCheckpoint
from .distributed import distributed_rank, gather_fingerprints, process_group_size, reduce_statistics
from .observers import Observer
from .stats import InputStats
from .targets import never_ran_message


@contextlib.contextmanager
def observing(model: nn.Module, observer: Observer, targets: dict[str, nn.Module]) -> Iterator[None]:
    """Inside: the model in eval mode with the observer's hooks on ``targets`` and its autograd context.
    On exit, even on error: every hook removed, every module's train/eval flag restored (the observer's
    context restores what it changed, e.g. ``requires_grad``)."""
    training_flags = {module: module.training for module in model.modules()}
    handles = observer.attach(targets)
    try:
        model.eval()
        with observer.passes(model):
            yield
    finally:
        for handle in handles:
            handle.remove()
        for module, flag in training_flags.items():
            module.training = flag


def model_config_hash(model) -> str | None:
    """SHA-256 of the model's configuration (``config.to_dict``, sorted keys), None without one."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_dict"):
        return None
    return hashlib.sha256(json.dumps(config.to_dict(), sort_keys=True, default=str).encode()).hexdigest()


class Checkpointing:
    """Saves the observer's sums every ``every`` batches into ``path`` and, when ``path`` exists, resumes:
    the sums are restored and the batch source skips the batches they hold (proving them the same data)."""

    def __init__(self, path: str | os.PathLike, every: int, settings: dict, progress: bool):
        self.saver = CalibrationCheckpoint(path, every, settings)
        self.progress = progress

    def resume(self, observer: Observer, source: BatchSource, devices: dict) -> None:
        batches, fingerprint = self.saver.restore(observer, devices)
        if batches:
            source.resume_after(batches, fingerprint, self.saver.path)
            if self.progress:
                print(f"resuming from checkpoint {self.saver.path}: {batches} batches already summed", file=sys.stderr)

    def after_batch(self, observer: Observer, source: BatchSource) -> None:
        if self.saver.due(source.seen):
            self.saver.save(observer, source.seen, source.fingerprint.hexdigest())

    def remove(self) -> None:
        self.saver.remove()


def checkpoint_settings(observer: Observer, exclude_first: int, targets: dict, model: nn.Module) -> dict:
    """The values that decide what a checkpoint's sums mean: a resume needs them all equal."""
    return {
        "mode": observer.mode, "statistic": observer.statistic, "exclude_first": exclude_first,
        "targets": sorted(targets), "model_config_sha256": model_config_hash(model),
        "world": [distributed_rank(), process_group_size()],
    }  # fmt: skip


def finish(
    observer: Observer, source: BatchSource, targets: dict, damp: float, keep_grams: bool, default_targets: bool
) -> tuple[int, dict[str, InputStats]]:
    """Reduce across the process group, check that every target ran on real tokens (``default_targets``:
    whether they were the default selection, for the advice where some did not), and finish the observer's
    sums; returns (batches seen by the whole group, the statistics of every input)."""
    batches = reduce_statistics(observer, source.seen)  # across the process group, if there is one
    if batches == 0:
        raise SensiloraError("the calibration set is empty: give at least one batch of text")
    if not observer.accumulators:
        raise SensiloraError(
            "every calibration batch was all padding (attention_mask == 0): give batches with real tokens"
        )
    missing = [name for name in targets if name not in observer.by_module]
    if missing:
        ran = [name for name in targets if name in observer.by_module]
        raise SensiloraError(never_ran_message(missing, ran, default_targets))
    return batches, observer.finish(damp, keep_grams)


def provenance(model: nn.Module, source: BatchSource, batches: int, tokens: int, seconds: float, **settings) -> dict:
    """The ``info`` recorded with the statistics: what was seen, how long it took, the settings, and the
    hashes of the data (every rank's, combined) and of the model's configuration."""
    ranks = gather_fingerprints(source.fingerprint.hexdigest())
    info = {"batches": batches, "tokens": tokens, "seconds": round(seconds, 3), **settings}
    info["data_sha256"] = combined_fingerprint(ranks)
    if len(ranks) > 1:
        info["data_sha256_per_rank"] = ranks
    info["model_config_sha256"] = model_config_hash(model)
    return info
