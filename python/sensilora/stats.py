"""``SensitivityStats``: the calibration result, saved once and reused (safetensors)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .errors import SensiloraError
from .io import write_with_atomic

FORMAT = "sensilora.stats/1"
MODES = ("diag", "obs")


@dataclass
class InputStats:
    """Statistics of one distinct input tensor (shared by e.g. q/k/v).

    hessian_diag: (d_in,) fp32, ``(2/N) sum_n x_n^2``. inverse_hessian_diag: (d_in,) fp32,
    ``diag((H + lambda I)^-1)`` in obs mode, else None. num_tokens: N real tokens. hessian: (d_in, d_in)
    fp32 ``H = (2/N) X^T X``, kept only by ``calibrate(mode="obs", keep_grams=True)`` (for merging).
    """

    hessian_diag: torch.Tensor
    num_tokens: int
    inverse_hessian_diag: torch.Tensor | None = None
    damp: float | None = None
    hessian: torch.Tensor | None = None


@dataclass
class SensitivityStats:
    """Per-module Hessian statistics of one model on one calibration set."""

    mode: str
    module_shapes: dict[str, tuple[int, int]]  # name -> (d_out, d_in)
    module_inputs: dict[str, str]  # name -> key of its InputStats
    inputs: dict[str, InputStats]
    model_name: str | None = None
    info: dict = field(default_factory=dict)

    @property
    def module_names(self) -> list[str]:
        return list(self.module_shapes)

    def _input(self, name: str) -> InputStats:
        if name not in self.module_inputs:
            raise SensiloraError(f"SensitivityStats has no module {name!r}; known: {self.module_names[:5]}...")
        return self.inputs[self.module_inputs[name]]

    def hessian_diag(self, name: str) -> torch.Tensor:
        """(d_in,) fp32 ``(2/N) * sum_n x_n^2`` for module ``name``."""
        return self._input(name).hessian_diag

    def inverse_hessian_diag(self, name: str) -> torch.Tensor:
        """(d_in,) fp32 damped inverse-Hessian diagonal (obs mode only)."""
        stats = self._input(name)
        if stats.inverse_hessian_diag is None:
            raise SensiloraError(
                f"module {name!r}: inverse Hessian diagonals exist only in obs mode; calibrate with mode='obs'"
            )
        return stats.inverse_hessian_diag

    def num_tokens(self, name: str) -> int:
        return self._input(name).num_tokens

    def save(self, path: str | os.PathLike) -> None:
        """Write one safetensors file (atomically): tensors per input, the rest as JSON metadata."""
        write_with_atomic(path, self.write_to)

    def write_to(self, path: Path) -> None:
        """Write the safetensors file to ``path`` directly (``save`` and ``io.commit_outputs`` make it atomic)."""
        keys = list(self.inputs)
        tensors = {}
        for index, key in enumerate(keys):
            stats = self.inputs[key]
            tensors[f"{index}.hessian_diag"] = stats.hessian_diag.detach().float().cpu().contiguous()
            if stats.inverse_hessian_diag is not None:
                tensors[f"{index}.inverse_hessian_diag"] = (
                    stats.inverse_hessian_diag.detach().float().cpu().contiguous()
                )
            if stats.hessian is not None:
                tensors[f"{index}.hessian"] = stats.hessian.detach().float().cpu().contiguous()
        header = {
            "format": FORMAT,
            "mode": self.mode,
            "model_name": self.model_name,
            "modules": {
                n: {"shape": list(s), "input": keys.index(self.module_inputs[n])} for n, s in self.module_shapes.items()
            },
            "inputs": [{"key": k, "num_tokens": self.inputs[k].num_tokens, "damp": self.inputs[k].damp} for k in keys],
            "info": self.info,
        }
        save_file(tensors, str(path), metadata={"sensilora": json.dumps(header)})

    @classmethod
    def load(cls, path: str | os.PathLike) -> "SensitivityStats":
        try:
            with safe_open(str(path), framework="pt") as handle:
                metadata = handle.metadata() or {}
                tensors = {key: handle.get_tensor(key) for key in handle.keys()}
        except (OSError, Exception) as error:
            raise SensiloraError(
                f"cannot read statistics file {path}: {error}; re-run calibration to write it"
            ) from error
        if "sensilora" not in metadata:
            raise SensiloraError(f"{path} is a safetensors file but not sensilora statistics (no 'sensilora' metadata)")
        header = json.loads(metadata["sensilora"])
        if header.get("format") != FORMAT:
            raise SensiloraError(f"{path}: unsupported statistics format {header.get('format')!r}, expected {FORMAT}")
        keys = [entry["key"] for entry in header["inputs"]]
        inputs = {
            entry["key"]: InputStats(
                hessian_diag=tensors[f"{index}.hessian_diag"],
                num_tokens=int(entry["num_tokens"]),
                inverse_hessian_diag=tensors.get(f"{index}.inverse_hessian_diag"),
                damp=entry.get("damp"),
                hessian=tensors.get(f"{index}.hessian"),
            )
            for index, entry in enumerate(header["inputs"])
        }
        modules = header["modules"]
        return cls(
            mode=header["mode"],
            module_shapes={n: tuple(m["shape"]) for n, m in modules.items()},
            module_inputs={n: keys[m["input"]] for n, m in modules.items()},
            inputs=inputs,
            model_name=header.get("model_name"),
            info=header.get("info", {}),
        )
