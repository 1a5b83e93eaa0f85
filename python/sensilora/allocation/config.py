"""``AllocationConfig``: every choice that turns metrics into ranks, validated once, saved verbatim."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ..errors import SensiloraError

METHODS = ("sra", "pra")
METRIC_SETS = ("both", "global", "local")
WEIGHTINGS = ("cv", "equal")
BUDGETS = ("ranks", "params")
AGGREGATIONS = ("paper", "rank")
RULES = ("sensitivity", "structural", "gora", "gradient-spectrum")
GRADIENT_RULES = ("gora", "gradient-spectrum")  # these read the mean loss gradient (``calibration.gradients``)
POOLINGS = ("none", "type-depth")


def check_choice(label: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise SensiloraError(f"{label} must be one of {', '.join(choices)}; got {value!r}")


def check_fractions(k_frac: float, alpha: float) -> None:
    """k_frac (eq. 9) and alpha (eq. 10) must lie in (0, 1]."""
    for label, value in (("k_frac", k_frac), ("alpha", alpha)):
        if isinstance(value, bool) or not (isinstance(value, (int, float)) and 0 < value <= 1):
            raise SensiloraError(f"{label} must be in (0, 1], got {value!r} (the paper uses k_frac=0.5, alpha=0.85)")


def _check_positive_int(label: str, value: object, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise SensiloraError(f"{label} must be a positive integer, got {value!r}")


def default_budget(method: str) -> str:
    """SRA spends uniform LoRA's trainable parameters; PRA's offsets keep the paper's rank sum."""
    return "ranks" if method == "pra" else "params"


@dataclass(frozen=True)
class AllocationConfig:
    """How ranks are allocated (METHOD.md sections 3-4).

    avg_rank: the uniform LoRA rank whose budget is shared out (paper: 4 NLU, 8 NLG).
    method: "sra" (ranks proportional to theta, eq. 15) or "pra" (rank offsets by theta group).
    metrics: "both" (theta, eq. 14), "global" (S_global alone) or "local" (S_local alone, eq. 12).
    weighting: "cv" (std/mean^2, eqs. 11 and 13) or "equal" (0.5/mean, the paper's ablation).
    k_frac, alpha: the top-k fraction (eq. 9) and the effective-rank energy (eq. 10).
    min_rank, max_rank: bounds on every rank (max_rank None: the largest whose adapter is no larger than its
    weight, ``d_out d_in / (d_out + d_in)``; METHOD.md section 4).
    budget: "params" (uniform LoRA's trainable parameters at avg_rank, not exceeded; SRA's default) or
    "ranks" (the paper: sum of ranks = avg_rank x #matrices, whatever parameters that costs; PRA's only).
    pra_groups: PRA's number of groups.
    aggregation: "rank" (the default: each metric replaced by its normalised rank among the matrices
    first, so no outlier rules theta; METHOD.md section 3b) or "paper" (eqs. 11-14 on the metrics as they
    are: the paper's exact method, ``AllocationConfig.paper()``). The default is the quality suite's
    choice by its pre-registered rule (METHOD.md section 3c): on LLaMA-family models the paper's theta
    hands most of the budget to the ``down_proj`` matrices that see massive activations.
    temperature: theta ** temperature before allocating (1: as combined; 0: uniform; in between: tempered).
    use_rslora: train with rsLoRA scaling alpha / sqrt(r) (one alpha for every rank) instead of alpha / r.
    rank_multiple: every rank a multiple of this (SRA; serving stacks such as vLLM prefer 8 or 16).
    rule: where theta comes from (METHOD.md section 4b): "sensitivity" (the metrics, as above), "structural"
    (no data: depth + 1), "gora" (GoRA's mean |W * G|, ranks in [avg/2, 4 avg]) or "gradient-spectrum"
    (greedy on the whitened gradient's singular values); the gradient rules need ``allocate(...,
    gradients=calibration.mean_gradients(model, batches))``.
    pooling: "none" or "type-depth" (theta averaged within module type x depth third before the ranks).
    """

    avg_rank: int = 8
    method: str = "sra"
    metrics: str = "both"
    weighting: str = "cv"
    k_frac: float = 0.5
    alpha: float = 0.85
    min_rank: int = 1
    max_rank: int | None = None
    budget: str | None = None
    pra_groups: int = 3
    aggregation: str = "rank"
    temperature: float = 1.0
    use_rslora: bool = False
    rank_multiple: int = 1
    rule: str = "sensitivity"
    pooling: str = "none"

    def __post_init__(self) -> None:
        if self.budget is None:  # frozen: the resolved default is stored as if it had been given
            object.__setattr__(self, "budget", default_budget(self.method))
        _check_positive_int("avg_rank", self.avg_rank)
        check_choice("method", self.method, METHODS)
        check_choice("metrics", self.metrics, METRIC_SETS)
        check_choice("weighting", self.weighting, WEIGHTINGS)
        check_choice("budget", self.budget, BUDGETS)
        check_fractions(self.k_frac, self.alpha)
        if isinstance(self.min_rank, bool) or not isinstance(self.min_rank, int) or self.min_rank < 1:
            raise SensiloraError(f"min_rank must be an integer >= 1 (peft rejects r=0), got {self.min_rank!r}")
        _check_positive_int("max_rank", self.max_rank, allow_none=True)
        _check_positive_int("pra_groups", self.pra_groups)
        if self.max_rank is not None and self.max_rank < self.min_rank:
            raise SensiloraError(f"max_rank={self.max_rank} is below min_rank={self.min_rank}; raise max_rank")
        if self.max_rank is not None and self.max_rank < self.avg_rank:
            raise SensiloraError(
                f"max_rank={self.max_rank} is below avg_rank={self.avg_rank}: the budget cannot be spent; raise it"
            )
        if self.min_rank > self.avg_rank:
            raise SensiloraError(
                f"min_rank={self.min_rank} exceeds avg_rank={self.avg_rank}; lower min_rank or raise avg_rank"
            )
        check_choice("aggregation", self.aggregation, AGGREGATIONS)
        if (
            isinstance(self.temperature, bool)
            or not isinstance(self.temperature, (int, float))
            or not 0 <= self.temperature <= 4
        ):
            raise SensiloraError(f"temperature must be a number in [0, 4] (1: the paper), got {self.temperature!r}")
        if not isinstance(self.use_rslora, bool):
            raise SensiloraError(f"use_rslora must be true or false, got {self.use_rslora!r}")
        _check_positive_int("rank_multiple", self.rank_multiple)
        if self.method == "pra" and self.rank_multiple != 1:
            raise SensiloraError("PRA assigns avg_rank +- offsets; use method='sra' with rank_multiple")
        if self.max_rank is not None and self.max_rank < self.rank_multiple:
            raise SensiloraError(f"max_rank={self.max_rank} is below rank_multiple={self.rank_multiple}; raise it")
        if self.method == "pra" and self.budget != "ranks":
            raise SensiloraError("PRA assigns rank offsets; use budget='ranks' with method='pra'")
        check_choice("rule", self.rule, RULES)
        check_choice("pooling", self.pooling, POOLINGS)
        if self.rule in GRADIENT_RULES and (self.method, self.budget, self.rank_multiple) != ("sra", "params", 1):
            raise SensiloraError(
                f"rule={self.rule!r} spends uniform LoRA's parameters rank by rank: use it with method='sra', "
                "budget='params', rank_multiple=1"
            )
        if self.rule == "gradient-spectrum" and (self.pooling != "none" or self.min_rank != 1):
            raise SensiloraError(
                "rule='gradient-spectrum' ranks each matrix's own singular values from rank 1: use it with "
                "pooling='none' and min_rank=1"
            )

    def replace(self, **changes) -> AllocationConfig:
        """A copy with ``changes`` applied (and validated); unknown names are an error."""
        unknown = sorted(set(changes) - {f.name for f in dataclasses.fields(self)})
        if unknown:
            raise SensiloraError(
                f"unknown allocation option(s) {unknown}; known: {[f.name for f in dataclasses.fields(self)]}"
            )
        if "method" in changes and "budget" not in changes and self.budget == default_budget(self.method):
            changes["budget"] = None  # follow the new method's default budget
        return dataclasses.replace(self, **changes)

    @classmethod
    def paper(cls, **changes) -> AllocationConfig:
        """The paper's exact method: eqs. 11-15 on the metrics as they are (``aggregation="paper"``)."""
        return cls(aggregation="paper").replace(**changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> AllocationConfig:
        """The inverse of ``to_dict`` (as saved in a ranks JSON); unknown keys are an error."""
        if not isinstance(data, dict):
            raise SensiloraError(f"an allocation config must be a JSON object, got {type(data).__name__}")
        # a file written before rank aggregation existed (no such key) holds the paper's allocation
        return cls().replace(**{"aggregation": "paper", **data})
