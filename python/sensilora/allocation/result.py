"""``RankAllocation``: per-module ranks with the evidence behind them, and its JSON file."""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from importlib.metadata import version

from torch import nn

from ..calibration.targets import linear_shape
from ..errors import SensiloraError
from ..io import write_text_atomic
from .config import AllocationConfig
from .metrics import ModuleMetrics

FORMAT = "sensilora.allocation/2"
READABLE_FORMATS = ("sensilora.allocation/1", FORMAT)
CONFIG_KEYS_V1 = ("method", "metrics", "weighting", "k_frac", "alpha", "min_rank", "max_rank", "budget", "pra_groups")


@dataclass
class RankAllocation:
    """Per-module LoRA ranks. Names are ``named_modules()`` names; shapes are (d_out, d_in).

    theta: the combined sensitivity (METHOD.md eq. 14) behind each rank; metrics: the per-matrix
    metrics (eqs. 8-10); config: how the ranks were allocated; mode: "diag" or "obs" statistics;
    calibration: what the statistics were computed on (tokens, batches, seconds, files, the SHA-256 of the
    calibration tokens and of the model config); version: the sensilora version that allocated.
    """

    ranks: dict[str, int]
    theta: dict[str, float]
    metrics: dict[str, ModuleMetrics]
    shapes: dict[str, tuple[int, int]]
    config: AllocationConfig
    mode: str = "diag"
    calibration: dict = field(default_factory=dict)
    model_name: str | None = None
    version: str = field(default_factory=lambda: version("sensilora"))

    @property
    def avg_rank(self) -> int:
        return self.config.avg_rank

    @property
    def trainable_parameters(self) -> int:
        return sum(r * sum(self.shapes[n]) for n, r in self.ranks.items())

    @property
    def uniform_parameters(self) -> int:
        return sum(self.avg_rank * sum(shape) for shape in self.shapes.values())

    def to_dict(self) -> dict:
        return {
            "format": FORMAT,
            "sensilora_version": self.version,
            "model": self.model_name,
            "mode": self.mode,
            "config": self.config.to_dict(),
            "calibration": self.calibration,
            "trainable_parameters": {"sensilora": self.trainable_parameters, "uniform_lora": self.uniform_parameters},
            "modules": {
                name: {
                    "rank": rank,
                    "theta": self.theta[name],
                    "shape": list(self.shapes[name]),
                    **self.metrics[name].as_dict(),
                }
                for name, rank in self.ranks.items()
            },
        }

    def save(self, path: str | os.PathLike) -> None:
        write_text_atomic(path, self.to_json())

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"

    @classmethod
    def from_dict(cls, data: dict, source: str = "the ranks data") -> RankAllocation:
        """Read what ``to_dict`` wrote (and the older ``sensilora.allocation/1`` layout)."""
        if not isinstance(data, dict) or data.get("format") not in READABLE_FORMATS:
            raise SensiloraError(f"{source} is not a sensilora ranks file (expected format {FORMAT!r})")
        try:
            if data["format"] == FORMAT:
                config, mode, calibration = (
                    AllocationConfig.from_dict(data["config"]),
                    data["mode"],
                    data.get("calibration", {}),
                )
            else:
                settings = data.get("settings", {})
                kept = {key: settings[key] for key in CONFIG_KEYS_V1 if key in settings}
                config = AllocationConfig(avg_rank=int(data["avg_rank"]), **kept)
                mode, calibration = settings.get("mode", "diag"), settings.get("calibration", {})
            modules = data["modules"]
            check_modules(modules, source)
            return cls(
                ranks={n: int(m["rank"]) for n, m in modules.items()},
                theta={n: float(m["theta"]) for n, m in modules.items()},
                metrics={
                    n: ModuleMetrics(m["global_sensitivity"], m["topk"], m["effective_rank"])
                    for n, m in modules.items()
                },
                shapes={n: tuple(m["shape"]) for n, m in modules.items()},
                config=config,
                mode=mode,
                calibration=calibration,
                model_name=data.get("model"),
                version=data.get("sensilora_version", "0.1.0"),
            )
        except SensiloraError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError) as error:
            raise SensiloraError(
                f"{source} is damaged: missing or malformed field {error}; re-run sensilora allocate"
            ) from error

    @classmethod
    def load(cls, path: str | os.PathLike) -> RankAllocation:
        """Read and validate a ranks file: every damaged or impossible field is refused in one line."""
        try:
            with open(path, encoding="utf-8-sig") as handle:
                data = json.loads(handle.read(), parse_constant=_refuse_constant)
        except (OSError, ValueError, RecursionError) as error:
            reason = "nested too deeply" if isinstance(error, RecursionError) else str(error).splitlines()[0]
            raise SensiloraError(f"cannot read ranks file {path}: {reason}") from None
        return cls.from_dict(data, source=str(path))

    def for_model(self, model: nn.Module) -> RankAllocation:
        """This allocation under ``model``'s module names: the same if they match, else mapped through one
        consistent prefix (ranks from a bare ``AutoModel``, ``encoder.layer.0...``, onto a task model's
        ``bert.encoder.layer.0...``, or the reverse); unchanged when no such prefix fits every module."""
        names = {name for name, _ in model.named_modules()}
        if all(name in names for name in self.ranks):
            return self
        first = next(iter(self.ranks))
        for other in sorted(names, key=len):
            if other.endswith("." + first):
                rename = lambda n, prefix=other[: -len(first)]: prefix + n  # noqa: E731
            elif first.endswith("." + other):
                cut = len(first) - len(other)
                rename = lambda n, cut=cut, head=first[:cut]: n[cut:] if n.startswith(head) else ""  # noqa: E731
            else:
                continue
            if all(rename(name) in names for name in self.ranks):
                return dataclasses.replace(
                    self,
                    ranks={rename(n): r for n, r in self.ranks.items()},
                    theta={rename(n): t for n, t in self.theta.items()},
                    metrics={rename(n): m for n, m in self.metrics.items()},
                    shapes={rename(n): s for n, s in self.shapes.items()},
                )
        return self

    def check_model(self, model: nn.Module) -> None:
        """Raise unless every module of the allocation exists in ``model`` with the same shape."""
        modules = dict(model.named_modules())
        missing = [n for n in self.ranks if n not in modules]
        wrong = [
            n
            for n in self.ranks
            if n in modules and (not hasattr(modules[n], "weight") or linear_shape(modules[n]) != tuple(self.shapes[n]))
        ]
        if missing or wrong:
            raise SensiloraError(
                f"the ranks file (model {self.model_name!r}) does not fit {type(model).__name__}: "
                f"missing modules {missing[:3]}, shape mismatches {wrong[:3]}; allocate ranks for this model"
            )


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not a number JSON allows")


def _positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_modules(modules, source: str) -> None:
    """Refuse a ranks file's ``modules`` unless each has a shape of two positive integers, an integer rank
    in [1, min(d_out, d_in)] (an adapter larger than that exceeds its weight's rank) and finite metrics."""
    if not isinstance(modules, dict) or not modules:
        raise SensiloraError(f"{source} lists no modules; re-run sensilora allocate")
    for name, entry in modules.items():
        shape = entry.get("shape") if isinstance(entry, dict) else None
        if not (isinstance(shape, list) and len(shape) == 2 and all(_positive_int(d) for d in shape)):
            raise SensiloraError(
                f"{source}: module {name!r} has shape {shape!r}, not [d_out, d_in]; the file is damaged"
            )
        rank = entry.get("rank")
        if not _positive_int(rank) or rank > min(shape):
            raise SensiloraError(
                f"{source}: module {name!r} has rank {rank!r}; a rank is an integer in [1, {min(shape)}] for its "
                f"{shape[0]} x {shape[1]} weight: re-run sensilora allocate"
            )
        fields = ("theta", "global_sensitivity", "topk", "effective_rank")
        bad = [f for f in fields if not _finite(entry.get(f))]
        if bad:
            raise SensiloraError(f"{source}: module {name!r} has no finite {bad[0]}; the file is damaged")
