"""Checkpoint and resume for long calibrations: the fp32 running sums, saved every N batches.

A checkpoint holds, in one safetensors file written atomically, every accumulator's sums (diag: the
squared-column sums; obs: ``X^T X``) and token count, which modules share an input, how many batches were
consumed, the SHA-256 of those batches' tokens, and the settings that decide what the sums mean (mode,
statistic, exclude_first, target modules, the model's config hash, rank and world size). Resuming reads the
same stream again: the first ``batches`` batches are hashed, not run, and must hash to the checkpoint's
fingerprint (else the data changed and the run stops), so no batch is counted twice or skipped. The file is
removed when the calibration finishes.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .collector import Accumulator, Collector
from .errors import SensiloraError
from .io import write_with_atomic

FORMAT = "sensilora.calibration-checkpoint/1"


class CalibrationCheckpoint:
    """Saves a ``Collector``'s sums every ``every`` batches to ``path`` and restores them.

    settings: JSON-able values that must be equal for the sums to be resumable (checked on load); ``every``
    is checked by ``calibration.check_calibration_options``."""

    def __init__(self, path: str | os.PathLike, every: int, settings: dict):
        self.path = Path(path)
        self.every = every
        self.settings = settings

    def due(self, seen_batches: int) -> bool:
        return seen_batches % self.every == 0

    def save(self, collector: Collector, seen_batches: int, fingerprint: str) -> None:
        keys = sorted(collector.accumulators)
        tensors = {f"{i}.sums": collector.accumulators[k].sums.detach().cpu().contiguous() for i, k in enumerate(keys)}
        header = {
            "format": FORMAT,
            "settings": self.settings,
            "batches": seen_batches,
            "fingerprint": fingerprint,
            "inputs": [{"key": k, "num_tokens": collector.accumulators[k].num_tokens} for k in keys],
            "modules": {name: accumulator.key for name, accumulator in collector.by_module.items()},
        }
        write_with_atomic(
            self.path, lambda tmp: save_file(tensors, str(tmp), metadata={"sensilora": json.dumps(header)})
        )

    def restore(self, collector: Collector, devices: dict[str, torch.device]) -> tuple[int, str | None]:
        """Load the sums into ``collector`` (empty), each accumulator on ``devices[its key]`` (the device of the
        module that owns it); returns (batches already consumed, their fingerprint), ``(0, None)`` when there
        is no checkpoint yet."""
        if not self.path.exists():
            return 0, None
        try:
            with safe_open(str(self.path), framework="pt") as handle:
                header = json.loads((handle.metadata() or {})["sensilora"])
                tensors = {key: handle.get_tensor(key) for key in handle.keys()}
        except Exception as error:
            raise SensiloraError(
                f"cannot read calibration checkpoint {self.path}: {error}; delete it to start the calibration afresh"
            ) from error
        if header.get("format") != FORMAT:
            raise SensiloraError(
                f"{self.path} is not a sensilora calibration checkpoint; delete it or pick another path"
            )
        different = {k: (v, self.settings.get(k)) for k, v in header["settings"].items() if self.settings.get(k) != v}
        if different or set(self.settings) != set(header["settings"]):
            raise SensiloraError(
                f"calibration checkpoint {self.path} was written with other settings ({different}, as (saved, now)); "
                "resume with the same settings, or delete it to start afresh"
            )
        for index, entry in enumerate(header["inputs"]):
            key = entry["key"]
            sums = tensors[f"{index}.sums"]
            accumulator = Accumulator(key, sums.shape[0], devices[key], collector.mode)
            accumulator.sums.copy_(sums)
            accumulator.num_tokens = int(entry["num_tokens"])
            collector.accumulators[key] = accumulator
        collector.by_module.update({name: collector.accumulators[key] for name, key in header["modules"].items()})
        return int(header["batches"]), header["fingerprint"]

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)


def check_resumed_data(fingerprint, saved: str | None, path) -> None:
    """The batches skipped on resume must be those the checkpoint summed (``DataFingerprint`` of both)."""
    if fingerprint.hexdigest() != saved:
        raise SensiloraError(
            f"the first batches of the calibration data differ from those summed in checkpoint {path}: resume "
            "with the same data, order and batch size, or delete the checkpoint to start afresh"
        )
