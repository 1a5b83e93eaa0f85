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
from safetensors.torch import save_file

from ..errors import SensiloraError
from ..io import read_tagged_safetensors, write_with_atomic
from .observers import Observer

FORMAT = "sensilora.calibration-checkpoint/1"


class CalibrationCheckpoint:
    """Saves an observer's sums every ``every`` batches to ``path`` and restores them.

    settings: JSON-able values that must be equal for the sums to be resumable (checked on load); ``every``
    is checked by ``calibration.check_calibration_options``."""

    def __init__(self, path: str | os.PathLike, every: int, settings: dict):
        self.path = Path(path)
        self.every = every
        self.settings = settings

    def due(self, seen_batches: int) -> bool:
        return seen_batches % self.every == 0

    def save(self, observer: Observer, seen_batches: int, fingerprint: str) -> None:
        tensors, layout = observer.state_dict()
        header = {
            "format": FORMAT, "settings": self.settings, "batches": seen_batches, "fingerprint": fingerprint, **layout
        }  # fmt: skip
        try:
            write_with_atomic(
                self.path, lambda tmp: save_file(tensors, str(tmp), metadata={"sensilora": json.dumps(header)})
            )
        except SensiloraError as error:  # a full disk, a read-only directory (see io.commit_outputs)
            raise SensiloraError(
                f"cannot save calibration checkpoint: {error}; free space there or give another --checkpoint path"
            ) from None

    def restore(self, observer: Observer, devices: dict[str, torch.device]) -> tuple[int, str | None]:
        """Load the sums into ``observer`` (empty), each accumulator on ``devices[its key]`` (the device of the
        module that owns it); returns (batches already consumed, their fingerprint), ``(0, None)`` when there
        is no checkpoint yet."""
        if not self.path.exists():
            return 0, None
        header, tensors = read_tagged_safetensors(
            self.path, FORMAT, "calibration checkpoint", "delete it to start the calibration afresh"
        )
        saved = header.get("settings") or {}
        different = {k: (v, self.settings.get(k)) for k, v in saved.items() if self.settings.get(k) != v}
        if different or set(self.settings) != set(saved):
            raise SensiloraError(
                f"calibration checkpoint {self.path} was written with other settings ({different}, as (saved, now)); "
                "resume with the same settings, or delete it to start afresh"
            )
        try:
            observer.load_state_dict(tensors, header, devices)
            return int(header["batches"]), str(header["fingerprint"])
        except (KeyError, IndexError, TypeError, ValueError) as error:
            raise SensiloraError(
                f"cannot read calibration checkpoint {self.path}: damaged ({type(error).__name__}: {error}); "
                "delete it to start the calibration afresh"
            ) from None

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)
