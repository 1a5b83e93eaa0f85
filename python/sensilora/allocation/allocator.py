"""``allocate``: statistics -> metrics (eqs. 8-10) -> theta (eqs. 11-14, or another rule of METHOD.md
section 4b) -> ranks (eq. 15, PRA, or the gradient spectrum's greedy)."""

from __future__ import annotations

import torch
from torch import nn

from ..calibration.stats import SensitivityStats
from ..calibration.targets import linear_weight, weights_loaded
from ..errors import SensiloraError
from .budgets import assign_ranks, largest_rank
from .combination import combine
from .config import GRADIENT_RULES, AllocationConfig
from .metrics import compute_metrics
from .result import RankAllocation
from .rules import gora_importance, gora_ranks, gradient_spectrum_values, greedy_ranks, pooled_theta, structural_theta


def allocate(
    stats: SensitivityStats,
    config: AllocationConfig | None = None,
    *,
    model: nn.Module | None = None,
    gradients: dict[str, torch.Tensor] | None = None,
    progress: bool = False,
    **overrides,
) -> RankAllocation:
    """Sensitivity-LoRA ranks from calibration statistics.

    config: an ``AllocationConfig`` (default: the paper's SRA at avg_rank 8); ``overrides`` replace
    fields of it, e.g. ``allocate(stats, avg_rank=4, max_rank=16)``. ``model`` (the calibrated model)
    is needed in obs mode and by ``rule="gora"``, for the weights. ``gradients``: {name: (d_out, d_in) mean
    loss gradient} (``calibration.mean_gradients``) for the gradient rules. progress: a bar over the obs
    metrics.
    """
    if config is not None and not isinstance(config, AllocationConfig):
        raise SensiloraError(
            f"allocate's second argument is an AllocationConfig, got {type(config).__name__}; pass avg_rank=... by name"
        )
    config = (config or AllocationConfig()).replace(**overrides)
    if config.rule in GRADIENT_RULES:
        check_gradients(stats, gradients, config.rule, model)
    module_metrics = compute_metrics(stats, config.k_frac, config.alpha, model=model, progress=progress)
    shapes = {n: tuple(stats.module_shapes[n]) for n in module_metrics}
    if config.rule == "sensitivity":
        theta = combine(module_metrics, config.metrics, config.weighting, config.aggregation, config.temperature)
    elif config.rule == "structural":
        theta = structural_theta(shapes)
    elif config.rule == "gora":
        theta = {}
        modules = dict(model.named_modules())
        for n in shapes:  # (d_out, d_in) as the gradients (a Conv1D's is stored transposed); offloaded: loaded
            with weights_loaded(modules[n]):
                weight = linear_weight(modules[n]).detach()
                theta.update(gora_importance({n: weight}, {n: gradients[n].to(weight.device)}))
    elif config.rule == "gradient-spectrum":
        values = gradient_spectrum_values({n: gradients[n] for n in shapes}, {n: stats.hessian_diag(n) for n in shapes})
        theta = {n: float(v.sum()) for n, v in values.items()}  # the whole whitened gradient energy, for reports
    if config.pooling == "type-depth":
        theta = pooled_theta(theta)
    if config.rule == "gradient-spectrum":
        ceilings = {n: min(largest_rank(*shapes[n]), config.max_rank or largest_rank(*shapes[n])) for n in shapes}
        ranks = greedy_ranks(values, shapes, config.avg_rank * sum(map(sum, shapes.values())), ceilings)
    elif config.rule == "gora":
        ranks = gora_ranks(theta, shapes, config.avg_rank, config.min_rank, config.max_rank)
    else:
        ranks = assign_ranks(theta, shapes, config)
    return RankAllocation(ranks, theta, module_metrics, shapes, config, stats.mode, dict(stats.info), stats.model_name)


def check_gradients(stats: SensitivityStats, gradients, rule: str, model: nn.Module | None) -> None:
    """Refuse, before any work, a gradient rule without the gradients (or, for GoRA, the model's weights)
    of every calibrated matrix, shapes matching."""
    if gradients is None:
        raise SensiloraError(
            f"rule={rule!r} needs the mean loss gradients: allocate(stats, config, "
            "gradients=sensilora.calibration.mean_gradients(model, batches))"
        )
    missing = [n for n in stats.module_names if n not in gradients]
    if missing:
        raise SensiloraError(f"gradients lack {len(missing)} calibrated module(s), e.g. {missing[0]!r}; recompute them")
    wrong = [n for n in stats.module_names if tuple(gradients[n].shape) != tuple(stats.module_shapes[n])]
    if wrong:
        raise SensiloraError(f"gradient of {wrong[0]!r} has shape {tuple(gradients[wrong[0]].shape)}, "
                             f"the module {tuple(stats.module_shapes[wrong[0]])}; recompute them")  # fmt: skip
    if rule == "gora" and model is None:
        raise SensiloraError("rule='gora' needs the model's weights (mean |W * G|): pass model=")
