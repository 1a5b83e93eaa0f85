"""From metrics to ranks (SPEC sections 3-4): combination weights, SRA/PRA, exact integer budgets."""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field

import numpy as np
from torch import nn

from .errors import SensiloraError
from .io import write_text_atomic
from .metrics import ModuleMetrics, check_fractions, compute_metrics
from .stats import SensitivityStats
from .targets import linear_shape

FORMAT = "sensilora.allocation/1"
METHODS = ("sra", "pra")
METRIC_SETS = ("both", "global", "local")
WEIGHTINGS = ("cv", "equal")
BUDGETS = ("ranks", "params")


def _check_choice(label: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise SensiloraError(f"{label} must be one of {', '.join(choices)}; got {value!r}")


def _coefficient(values: np.ndarray, weighting: str) -> float:
    """eq. 11/13: std/mean^2 ("cv") or 0.5/mean ("equal"); 0 for an all-zero metric."""
    mean = float(values.mean())
    if mean == 0.0:
        return 0.0
    return float(values.std()) / mean**2 if weighting == "cv" else 0.5 / mean


def combine(metrics: dict[str, ModuleMetrics], metric_set: str = "both", weighting: str = "cv") -> dict[str, float]:
    """theta per module (eqs. 11-14), or S_global / S_local alone for the paper's ablations."""
    _check_choice("metrics", metric_set, METRIC_SETS)
    _check_choice("weighting", weighting, WEIGHTINGS)
    names = list(metrics)
    global_s = np.array([metrics[n].global_sensitivity for n in names], dtype=np.float64)
    topk = np.array([metrics[n].topk for n in names], dtype=np.float64)
    eff = np.array([metrics[n].effective_rank for n in names], dtype=np.float64)
    local = _coefficient(topk, weighting) * topk + _coefficient(eff, weighting) * eff
    if metric_set == "global":
        theta = global_s
    elif metric_set == "local":
        theta = local
    else:
        theta = _coefficient(global_s, weighting) * global_s + _coefficient(local, weighting) * local
    return dict(zip(names, theta.tolist()))


def _water_fill(theta, cost, budget, low, high) -> np.ndarray:
    """Real ranks ``clip(c*theta, low, high)`` with ``sum(cost*r) == budget`` (bisection on c)."""
    if theta.sum() <= 0:
        theta = np.ones_like(theta)  # no sensitivity information: share evenly
    spent = lambda c: float((cost * np.clip(c * theta, low, high)).sum())  # noqa: E731
    lo, hi = 0.0, 1.0
    while spent(hi) < budget and hi < 1e300:
        hi *= 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if spent(mid) < budget else (lo, mid)
    return np.clip(hi * theta, low, high)


def _largest_remainder(real, cost, budget, low, high, names) -> np.ndarray:
    """Integer ranks: floors, then +1 by largest remainder (ties by name) while the budget allows."""
    real = np.round(real, 9)
    ranks = np.clip(np.floor(real), low, high).astype(np.int64)
    left = int(round(budget - float((cost * ranks).sum())))
    order = sorted(range(len(names)), key=lambda i: (-(real[i] - math.floor(real[i])), names[i]))
    changed = True
    while left > 0 and changed:
        changed = False
        for i in order:
            if ranks[i] < high[i] and cost[i] <= left:
                ranks[i] += 1
                left -= int(cost[i])
                changed = True
    return ranks


def sra_ranks(
    theta: dict[str, float],
    shapes: dict[str, tuple[int, int]],
    avg_rank: int,
    min_rank: int = 1,
    budget: str = "ranks",
    max_rank: int | None = None,
) -> dict[str, int]:
    """eq. 15: ranks proportional to theta within ``[min_rank, min(d_out, d_in, max_rank)]``.

    budget="ranks": ``sum r == avg_rank * #matrices`` exactly. budget="params": the trainable
    parameters ``sum r*(d_out+d_in)`` do not exceed uniform LoRA's at avg_rank (and come as close as
    integer ranks allow).
    """
    _check_choice("budget", budget, BUDGETS)
    names = list(theta)
    dims = np.array([shapes[n] for n in names], dtype=np.int64)
    high = dims.min(axis=1) if max_rank is None else np.minimum(dims.min(axis=1), max_rank)
    low = np.full(len(names), min_rank, dtype=np.int64)
    cost = dims.sum(axis=1) if budget == "params" else np.ones(len(names), dtype=np.int64)
    total = int(avg_rank * cost.sum())
    if total < int((cost * low).sum()):
        raise SensiloraError(
            f"budget too small: avg_rank={avg_rank} over {len(names)} matrices is below min_rank={min_rank} each; "
            "raise avg_rank or lower min_rank"
        )
    if total > int((cost * high).sum()):
        raise SensiloraError(
            f"avg_rank={avg_rank} exceeds what the matrices can hold (rank <= min(d_out, d_in, max_rank={max_rank})); lower it"
        )
    values = np.maximum(np.array([theta[n] for n in names], dtype=np.float64), 0.0)
    real = _water_fill(values, cost.astype(np.float64), float(total), low.astype(np.float64), high.astype(np.float64))
    ranks = _largest_remainder(real, cost, total, low, high, names)
    return dict(zip(names, ranks.tolist()))


def pra_offsets(groups: int) -> list[int]:
    """Symmetric integer offsets, largest first: 3 -> [1, 0, -1]; 4 -> [2, 1, -1, -2]."""
    if groups % 2:
        return [groups // 2 - c for c in range(groups)]
    half = groups // 2
    return [half - c for c in range(half)] + [-(c + 1) for c in range(half)]


def pra_ranks(theta: dict[str, float], shapes, avg_rank: int, groups: int = 3, min_rank: int = 1) -> dict[str, int]:
    """Sort by theta, split into equal groups, give group c ``avg_rank + offset_c`` (SPEC 4, PRA)."""
    names = sorted(theta, key=lambda n: (-theta[n], n))
    if groups < 1 or groups > len(names):
        raise SensiloraError(f"pra groups must be in [1, {len(names)}], got {groups}")
    base, extra = divmod(len(names), groups)
    if extra and groups % 2 == 0:
        raise SensiloraError(f"PRA with an even number of groups ({groups}) needs #matrices ({len(names)}) divisible by it")
    sizes = [base + (extra if (groups % 2 and c == groups // 2) else 0) for c in range(groups)]
    offsets = pra_offsets(groups)
    if avg_rank + min(offsets) < min_rank:
        raise SensiloraError(f"PRA: avg_rank {avg_rank} + offset {min(offsets)} falls below min_rank={min_rank}; use fewer groups")
    ranks, start = {}, 0
    for size, offset in zip(sizes, offsets):
        for name in names[start : start + size]:
            if avg_rank + offset > min(shapes[name]):
                raise SensiloraError(f"PRA: rank {avg_rank + offset} exceeds min(d_out, d_in) of {name}; lower avg_rank")
            ranks[name] = avg_rank + offset
        start += size
    return {name: ranks[name] for name in theta}


@dataclass
class RankAllocation:
    """Per-module LoRA ranks with the evidence behind them. Names are ``named_modules()`` names."""

    ranks: dict[str, int]
    theta: dict[str, float]
    metrics: dict[str, ModuleMetrics]
    shapes: dict[str, tuple[int, int]]
    avg_rank: int
    settings: dict = field(default_factory=dict)
    model_name: str | None = None

    @property
    def trainable_parameters(self) -> int:
        return sum(r * sum(self.shapes[n]) for n, r in self.ranks.items())

    @property
    def uniform_parameters(self) -> int:
        return sum(self.avg_rank * sum(shape) for shape in self.shapes.values())

    def to_dict(self) -> dict:
        return {
            "format": FORMAT,
            "model": self.model_name,
            "avg_rank": self.avg_rank,
            "settings": self.settings,
            "trainable_parameters": {"sensilora": self.trainable_parameters, "uniform_lora": self.uniform_parameters},
            "modules": {
                name: {"rank": rank, "theta": self.theta[name], "shape": list(self.shapes[name]), **self.metrics[name].as_dict()}
                for name, rank in self.ranks.items()
            },
        }

    def save(self, path: str | os.PathLike) -> None:
        write_text_atomic(path, json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike) -> "RankAllocation":
        try:
            data = json.loads(open(path, encoding="utf-8").read())
        except (OSError, ValueError) as error:
            raise SensiloraError(f"cannot read ranks file {path}: {error}") from error
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise SensiloraError(f"{path} is not a sensilora ranks file (expected format {FORMAT!r})")
        modules = data["modules"]
        return cls(
            ranks={n: int(m["rank"]) for n, m in modules.items()},
            theta={n: float(m["theta"]) for n, m in modules.items()},
            metrics={n: ModuleMetrics(m["global_sensitivity"], m["topk"], m["effective_rank"]) for n, m in modules.items()},
            shapes={n: tuple(m["shape"]) for n, m in modules.items()},
            avg_rank=int(data["avg_rank"]),
            settings=data.get("settings", {}),
            model_name=data.get("model"),
        )

    def check_model(self, model: nn.Module) -> None:
        """Raise unless every module of the allocation exists in ``model`` with the same shape."""
        modules = dict(model.named_modules())
        missing = [n for n in self.ranks if n not in modules]
        wrong = [n for n in self.ranks if n in modules and (not hasattr(modules[n], "weight") or linear_shape(modules[n]) != tuple(self.shapes[n]))]
        if missing or wrong:
            raise SensiloraError(
                f"the ranks file (model {self.model_name!r}) does not fit {type(model).__name__}: "
                f"missing modules {missing[:3]}, shape mismatches {wrong[:3]}; allocate ranks for this model"
            )

    def to_lora_config(self, **lora_kwargs):
        """A ``peft.LoraConfig`` carrying these ranks; see ``sensilora.lora.lora_config``."""
        from .lora import lora_config

        return lora_config(self, **lora_kwargs)


def allocate(
    stats: SensitivityStats,
    avg_rank: int,
    method: str = "sra",
    metrics: str = "both",
    weighting: str = "cv",
    k_frac: float = 0.5,
    alpha: float = 0.85,
    min_rank: int = 1,
    budget: str = "ranks",
    *,
    model: nn.Module | None = None,
    pra_groups: int = 3,
    max_rank: int | None = None,
) -> RankAllocation:
    """Sensitivity-LoRA ranks from calibration statistics (``model`` is needed in obs mode only).

    max_rank (SRA only) caps every rank below min(d_out, d_in); the surplus goes to the others.
    """
    _check_choice("method", method, METHODS)
    check_fractions(k_frac, alpha)
    if not isinstance(avg_rank, int) or avg_rank < 1:
        raise SensiloraError(f"avg_rank must be a positive integer, got {avg_rank!r}")
    if min_rank < 1:
        raise SensiloraError(f"min_rank must be >= 1 (peft rejects r=0), got {min_rank}")
    module_metrics = compute_metrics(stats, k_frac, alpha, model=model)
    theta = combine(module_metrics, metrics, weighting)
    shapes = {n: tuple(stats.module_shapes[n]) for n in theta}
    if method == "sra":
        ranks = sra_ranks(theta, shapes, avg_rank, min_rank, budget, max_rank)
    else:
        if budget != "ranks":
            raise SensiloraError("PRA assigns rank offsets; use budget='ranks' with method='pra'")
        ranks = pra_ranks(theta, shapes, avg_rank, pra_groups, min_rank)
    settings = {
        "mode": stats.mode, "method": method, "metrics": metrics, "weighting": weighting, "k_frac": k_frac,
        "alpha": alpha, "min_rank": min_rank, "max_rank": max_rank, "budget": budget, "calibration": stats.info,
    }
    if method == "pra":
        settings["pra_groups"] = pra_groups
    return RankAllocation(ranks, theta, module_metrics, shapes, avg_rank, settings, stats.model_name)
