"""``SensitivityStats``: the calibration result, saved once and reused (safetensors)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..errors import SensiloraError
from ..io import read_tagged_safetensors, write_with_atomic

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
    def load(cls, path: str | os.PathLike) -> SensitivityStats:
        """Read and validate a statistics file: every damaged or inconsistent field is refused in one line."""
        header, tensors = read_tagged_safetensors(path, FORMAT, "statistics file", "re-run calibration to write it")
        try:
            return cls._from_header(header, tensors, path)
        except (KeyError, IndexError, TypeError, ValueError, AttributeError) as error:
            raise SensiloraError(
                f"{path}: damaged statistics header ({type(error).__name__}: {error}); re-run calibration to write it"
            ) from None

    @classmethod
    def _from_header(cls, header: dict, tensors: dict, path) -> SensitivityStats:
        mode = header["mode"]
        if mode not in MODES:
            raise ValueError(f"mode {mode!r} is not one of {MODES}")
        keys = [str(entry["key"]) for entry in header["inputs"]]
        inputs = {}
        for index, entry in enumerate(header["inputs"]):
            tokens = entry["num_tokens"]
            if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 1:
                raise ValueError(f"input {entry['key']!r} has num_tokens {tokens!r}, not a positive integer")
            inputs[keys[index]] = InputStats(
                hessian_diag=tensors[f"{index}.hessian_diag"],
                num_tokens=tokens,
                inverse_hessian_diag=tensors.get(f"{index}.inverse_hessian_diag"),
                damp=entry.get("damp"),
                hessian=tensors.get(f"{index}.hessian"),
            )
        modules = header["modules"]
        if not isinstance(modules, dict) or not modules:
            raise ValueError("the file lists no modules")
        stats = cls(
            mode=mode,
            module_shapes={str(n): tuple(int(d) for d in m["shape"]) for n, m in modules.items()},
            module_inputs={str(n): keys[int(m["input"])] for n, m in modules.items()},
            inputs=inputs,
            model_name=header.get("model_name"),
            info=dict(header.get("info") or {}),
        )
        stats.validate(path)
        return stats

    def validate(self, where: object = "statistics") -> None:
        """Refuse statistics whose tensors do not fit their modules, or hold NaN/Inf or negative values."""
        for name, (d_out, d_in) in self.module_shapes.items():
            if d_out < 1 or d_in < 1:
                raise SensiloraError(f"{where}: module {name!r} has shape {(d_out, d_in)}; the file is damaged")
            stats = self.inputs[self.module_inputs[name]]
            expected = {"hessian_diag": (d_in,), "inverse_hessian_diag": (d_in,), "hessian": (d_in, d_in)}
            for field_name, shape in expected.items():
                value = getattr(stats, field_name)
                if value is None:
                    if field_name == "inverse_hessian_diag" and self.mode == "obs":
                        raise SensiloraError(f"{where}: obs-mode module {name!r} has no inverse Hessian diagonal")
                    continue
                if tuple(value.shape) != shape or not torch.is_floating_point(value):
                    raise SensiloraError(
                        f"{where}: {field_name} of module {name!r} is {value.dtype} {tuple(value.shape)}, "
                        f"expected floating point {shape} for its (d_out, d_in) = {(d_out, d_in)}; the file is damaged"
                    )
                if not bool(torch.isfinite(value).all()) or (field_name != "hessian" and bool((value < 0).any())):
                    raise SensiloraError(
                        f"{where}: {field_name} of module {name!r} holds NaN/Inf or negative values; re-run calibration"
                    )
