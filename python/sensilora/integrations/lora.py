"""peft integration (METHOD.md section 5): a LoraConfig with per-module ranks, verified after wrapping."""

from __future__ import annotations

import math
import re

from torch import nn

from ..allocation.result import RankAllocation
from ..calibration.targets import stores_weight_transposed
from ..errors import SensiloraError

RESERVED = ("r", "target_modules", "rank_pattern", "alpha_pattern")
# peft 0.15 is the first to match rank_pattern keys as ``(.*\.)?(KEY)$``; older versions use ``.*\.KEY$``,
# where a full-name key never matches the unprefixed module and every module silently falls back to r.
MIN_PEFT = (0, 15)


def check_peft_version(version: str) -> None:
    """Refuse peft versions whose rank_pattern matching ignores our anchored full-name keys."""
    try:
        found = tuple(int(part) for part in version.split(".")[:2])
    except ValueError:
        return  # a development build: trust it, verify_ranks still checks the result
    if found < MIN_PEFT:
        raise SensiloraError(
            f"peft {version} matches rank_pattern keys in a way that ignores sensilora's per-module ranks; "
            f"upgrade it: pip install 'peft>={MIN_PEFT[0]}.{MIN_PEFT[1]}'"
        )


def pattern_key(name: str) -> str:
    """An escaped peft pattern key for the module ``name`` and the same module under a longer prefix.

    peft matches a key as ``re.match(r"(.*\\.)?(KEY)$", module_name)``: the escaped full name selects that
    module and the one that carries it under a prefix (ranks computed on a bare ``AutoModel``,
    ``encoder.layer.0...``, reach a task model's ``bert.encoder.layer.0...``), never another layer
    (``layers.1.q_proj`` does not catch ``layers.11.q_proj``: a key must end at a dot boundary). Where two
    allocated names end alike (``vision.model.layers.1.q_proj`` and ``model.layers.1.q_proj``), the longer
    key comes first in ``rank_patterns`` and peft takes the first key that matches.
    """
    return re.escape(name)


def rank_patterns(values: dict[str, float]) -> dict[str, float]:
    """``{pattern_key(name): value}``, longest name first (so a more specific key is matched first)."""
    return {pattern_key(name): values[name] for name in sorted(values, key=lambda n: (-len(n), n))}


def check_lora_options(lora_alpha: float | None, lora_dropout: float) -> None:
    """Refuse an alpha that is not a finite positive number (None: the default) or a dropout outside [0, 1)."""
    if lora_alpha is not None and not (
        isinstance(lora_alpha, (int, float)) and not isinstance(lora_alpha, bool) and math.isfinite(lora_alpha)
        and lora_alpha > 0
    ):  # fmt: skip
        raise SensiloraError(f"lora_alpha must be a finite positive number, got {lora_alpha!r}")
    if isinstance(lora_dropout, bool) or not isinstance(lora_dropout, (int, float)) or not 0.0 <= lora_dropout < 1.0:
        raise SensiloraError(f"lora_dropout is a probability in [0, 1), got {lora_dropout!r}")


def lora_config(
    allocation: RankAllocation, lora_alpha: float | None = None, keep_alpha_ratio: bool = True, **lora_kwargs
):
    """``peft.LoraConfig(r=avg_rank, rank_pattern=..., alpha_pattern=...)`` for ``allocation``.

    lora_alpha: alpha at r=avg_rank (default 2*avg_rank). keep_alpha_ratio: give every module
    ``alpha = lora_alpha/avg_rank * r`` so that the LoRA scaling alpha/r is the same everywhere.
    With ``allocation.config.use_rslora`` (or ``use_rslora=True`` here) the scaling is rsLoRA's
    ``alpha' / sqrt(r)`` with one ``alpha' = lora_alpha / sqrt(avg_rank)`` for every module: equal to plain
    LoRA's ``lora_alpha / avg_rank`` at the average rank, falling as ``1 / sqrt(r)`` above it.
    Other keyword arguments (lora_dropout, task_type, modules_to_save, ...) go to LoraConfig.
    """
    import peft

    check_peft_version(peft.__version__)
    clash = [key for key in RESERVED if key in lora_kwargs]
    if clash:
        raise SensiloraError(f"{clash} are set by the allocation; remove them from the LoRA keyword arguments")
    check_lora_options(lora_alpha, lora_kwargs.get("lora_dropout", 0.0))
    alpha = float(lora_alpha if lora_alpha is not None else 2 * allocation.avg_rank)
    ratio = alpha / allocation.avg_rank
    rank_pattern = rank_patterns(allocation.ranks)
    alpha_pattern = rank_patterns({n: ratio * r for n, r in allocation.ranks.items()}) if keep_alpha_ratio else {}
    lora_kwargs.setdefault("use_rslora", allocation.config.use_rslora)
    if lora_kwargs["use_rslora"]:
        alpha, alpha_pattern = alpha / math.sqrt(allocation.avg_rank), {}
    return peft.LoraConfig(
        r=allocation.avg_rank,
        lora_alpha=alpha,
        target_modules=list(allocation.ranks),
        rank_pattern=rank_pattern,
        alpha_pattern=alpha_pattern,
        **lora_kwargs,
    )


def adapter_ranks(peft_model: nn.Module, adapter_name: str = "default") -> dict[str, int]:
    """The rank each LoRA layer of a peft model got, by the base model's module name. Adapters of parameters
    (peft's ``target_parameters``, e.g. a mixture-of-experts model's fused 3-D expert weights: one uniform
    rank, outside the allocation) are not layers the allocation ranks, and are left out."""
    from peft.tuners.lora import LoraLayer

    try:
        from peft.tuners.lora.layer import ParamWrapper
    except ImportError:  # peft < 0.17: no target_parameters
        ParamWrapper = ()
    prefix = "base_model.model."
    return {
        (name.removeprefix(prefix)): int(module.r[adapter_name])
        for name, module in peft_model.named_modules()
        if isinstance(module, LoraLayer) and not isinstance(module, ParamWrapper) and adapter_name in module.r
    }


def verify_ranks(peft_model: nn.Module, allocation: RankAllocation, adapter_name: str = "default") -> None:
    """Raise unless every allocated module carries exactly its rank (peft silently falls back to r)."""
    got = adapter_ranks(peft_model, adapter_name)
    missing = [n for n in allocation.ranks if n not in got]
    wrong = {n: (got[n], r) for n, r in allocation.ranks.items() if n in got and got[n] != r}
    extra = [n for n in got if n not in allocation.ranks]
    if missing or wrong or extra:
        raise SensiloraError(
            f"peft did not apply the allocation: missing {missing[:3]}, "
            f"wrong ranks (got, wanted) {dict(list(wrong.items())[:3])}, "
            f"unexpected adapters {extra[:3]}; this is a sensilora/peft incompatibility, "
            "please report it with your peft version"
        )


def get_peft_model(model: nn.Module, allocation: RankAllocation, adapter_name: str = "default", **lora_kwargs):
    """Wrap ``model`` with LoRA adapters of the allocated ranks and check that peft applied each one
    (``fan_in_fan_out`` defaults to True where the targets are transposed ``Conv1D`` layers)."""
    import peft

    allocation = allocation.for_model(model)
    allocation.check_model(model)
    modules = dict(model.named_modules())
    if any(stores_weight_transposed(modules[name]) for name in allocation.ranks):
        lora_kwargs.setdefault("fan_in_fan_out", True)  # GPT-2 style Conv1D; peft would fix it with a warning
    peft_model = peft.get_peft_model(model, lora_config(allocation, **lora_kwargs), adapter_name=adapter_name)
    verify_ranks(peft_model, allocation, adapter_name)
    return peft_model
