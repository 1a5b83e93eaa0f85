"""The methods compared by the quality evaluation, each turned into a fresh peft model.

Every Sensitivity-LoRA variant allocates at uniform LoRA's trainable-parameter budget (``budget="params"``)
from statistics computed once per task (on the task's training split). EVA (peft's data-driven rank
redistribution and initialisation) is computed once per task too. ``shuffled`` is the control: the paper's
multiset of ranks permuted among matrices of the same shape (a new permutation per seed), which keeps the
shape of the rank distribution and the parameter count but drops what theta knows about each matrix.
AdaLoRA and HyperAdaLoRA (``hyperadalora.py``) allocate during training under one schedule and end at
uniform LoRA's average rank.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import sensilora
import torch
from sensilora.integrations.lora import pattern_key

from benchmarks.quality.hyperadalora import HyperAdaLoraModel, adapter_parameters

# name -> (calibrate keyword arguments, AllocationConfig overrides)
# (every variant but "rank" is the paper's aggregation, named: the library default is now rank aggregation)
PAPER = {"aggregation": "paper"}
SENSILORA_VARIANTS = {
    "paper": ({}, PAPER),
    "paper-obs": ({"mode": "obs"}, PAPER),
    "rank": ({}, {"aggregation": "rank"}),
    "tempered": ({}, {**PAPER, "temperature": 0.5}),
    "sink-excluded": ({"exclude_first": 1}, PAPER),
    "fisher": ({"statistic": "fisher"}, PAPER),
    "robust": ({"statistic": "hessian-robust"}, PAPER),
}
EVA_RHO = 2.0  # EVA's rho: a matrix gets at most rho x the average rank
ALL_METHODS = ("lora", *SENSILORA_VARIANTS, "shuffled", "eva", "eva-ranks", "adalora", "hyperadalora")
# A method name with this suffix is that method trained at its own learning rate, chosen on dev like LoRA's
# (NLU only): the SVD form starts with Λ = 0 and may want another step size than LoRA.
OWN_LR = "@own-lr"


@dataclass
class TaskContext:
    """What a task computes once and every run reuses."""

    base: torch.nn.Module
    targets: list[str]
    avg_rank: int
    task_type: str
    steps: int
    allocations: dict = field(default_factory=dict)  # variant -> RankAllocation
    calibration_seconds: dict = field(default_factory=dict)  # variant -> seconds
    stats: dict = field(default_factory=dict)  # calibrate options (sorted items) -> SensitivityStats
    eva_state: dict | None = None
    eva_seconds: float = 0.0
    epoch: Callable | None = None  # epoch(generator) -> the training batches in that generator's order
    loss: Callable | None = None  # loss(model, batch), where the task's loss is not the model's own


def prepare(context: TaskContext, methods, calibration_batches, eva_batches) -> None:
    """Statistics and allocations for every Sensitivity-LoRA variant in ``methods`` (and the shuffled
    control), EVA's state if asked for: each once."""
    import time

    import peft

    needed = {m for m in methods if m in SENSILORA_VARIANTS} | ({"paper"} if "shuffled" in methods else set())
    for variant in sorted(needed):
        calibrate_options, allocation_options = SENSILORA_VARIANTS[variant]
        key = tuple(sorted(calibrate_options.items()))
        start = time.perf_counter()
        if key not in context.stats:
            context.stats[key] = sensilora.calibrate(
                context.base, calibration_batches, progress=False, **calibrate_options
            )
        config = sensilora.AllocationConfig(avg_rank=context.avg_rank, budget="params", **allocation_options)
        context.allocations[variant] = sensilora.allocate(context.stats[key], config, model=context.base)
        context.calibration_seconds[variant] = time.perf_counter() - start
    if {"eva", "eva-ranks"} & set(methods):
        start = time.perf_counter()
        model = copy.deepcopy(context.base)
        config = eva_config(context, init="eva")
        context.eva_state = peft.get_eva_state_dict(
            peft.get_peft_model(model, config), eva_batches, show_progress_bar=False
        )
        context.eva_seconds = time.perf_counter() - start


def adalora_config(context: TaskContext):
    """AdaLoRA's schedule, shared by HyperAdaLoRA: ranks start at 1.5 x avg, the budget stays fixed for the
    first 10 % of the steps, is pruned (cubic schedule) to avg rank until 75 %, then fixed."""
    import peft

    return peft.AdaLoraConfig(
        init_r=int(1.5 * context.avg_rank), target_r=context.avg_rank, lora_alpha=2 * context.avg_rank,
        target_modules=context.targets, task_type=context.task_type, total_step=context.steps,
        tinit=context.steps // 10, tfinal=context.steps // 4, deltaT=1,
    )  # fmt: skip


def eva_config(context: TaskContext, init):
    import peft

    use_label_mask = context.task_type == "CAUSAL_LM"  # classification labels are not token labels
    return peft.LoraConfig(
        r=context.avg_rank,
        lora_alpha=2 * context.avg_rank,
        target_modules=context.targets,
        task_type=context.task_type,
        init_lora_weights=init,
        eva_config=peft.EvaConfig(rho=EVA_RHO, use_label_mask=use_label_mask),
    )


def eva_ranks(context: TaskContext) -> dict[str, int]:
    """The ranks EVA redistributed (its state holds one (r, d_in) component matrix per module; r = 0 where
    EVA leaves a module without an adapter)."""
    prefix = "base_model.model."
    return {name.removeprefix(prefix): int(tensor.shape[0]) for name, tensor in context.eva_state.items()}


def adapted_targets(targets: list[str], ranks: dict[str, int]) -> tuple[list[str], dict[str, int]]:
    """For per-module ranks {module name: rank} (EVA's): the ``targets`` that keep an adapter (EVA leaves a
    module of rank 0 without one) and peft's ``rank_pattern`` of the others."""
    kept = [name for name in targets if ranks.get(name, 1) > 0]
    return kept, {pattern_key(n): r for n, r in ranks.items() if r > 0}


def shuffled_allocation(allocation, seed: int):
    """The allocation's ranks permuted among matrices of equal shape (seeded)."""
    generator = np.random.default_rng(seed)
    ranks = dict(allocation.ranks)
    for shape in set(allocation.shapes.values()):
        names = [n for n in allocation.ranks if allocation.shapes[n] == shape]
        permuted = generator.permutation([allocation.ranks[n] for n in names])
        ranks.update(zip(names, (int(r) for r in permuted)))
    return dataclasses.replace(allocation, ranks=ranks)


def build(method: str, context: TaskContext, seed: int):
    """A fresh copy of the base model wrapped for ``method``; returns (peft model, per-step hook or None)."""
    import peft

    method = method.removesuffix(OWN_LR)
    model = copy.deepcopy(context.base)
    alpha = 2 * context.avg_rank
    if method == "lora":
        config = peft.LoraConfig(
            r=context.avg_rank, lora_alpha=alpha, target_modules=context.targets, task_type=context.task_type
        )
        return peft.get_peft_model(model, config), None
    if method in ("adalora", "hyperadalora"):
        peft_model = peft.get_peft_model(model, adalora_config(context))
        if method == "adalora":
            return peft_model, lambda step: peft_model.base_model.update_and_allocate(step)
        hyper = HyperAdaLoraModel(peft_model)
        return hyper, hyper.after_step
    if method == "eva":
        peft_model = peft.get_peft_model(model, eva_config(context, init="eva"))
        peft.initialize_lora_eva_weights(
            peft_model, eva_state_dict=copy.deepcopy(context.eva_state), show_progress_bar=False
        )
        return peft_model, None
    if method == "eva-ranks":  # EVA's rank redistribution with LoRA's standard initialisation
        targets, rank_pattern = adapted_targets(context.targets, eva_ranks(context))
        config = peft.LoraConfig(
            r=context.avg_rank, lora_alpha=alpha, task_type=context.task_type, target_modules=targets,
            rank_pattern=rank_pattern, alpha_pattern={key: 2 * r for key, r in rank_pattern.items()},
        )  # fmt: skip
        return peft.get_peft_model(model, config), None
    allocation = (
        shuffled_allocation(context.allocations["paper"], seed) if method == "shuffled" else context.allocations[method]
    )
    return sensilora.get_peft_model(model, allocation, lora_alpha=alpha, task_type=context.task_type), None


def allocated(context: TaskContext, method: str):
    """The allocation a method trains with (the shuffled control: the one it permutes), or None."""
    method = method.removesuffix(OWN_LR)
    return context.allocations.get("paper" if method == "shuffled" else method)


def allocation_fingerprint(context: TaskContext, method: str) -> str | None:
    """SHA-256 of the ranks behind ``method``'s adapter; None for a method without a sensilora allocation."""
    allocation = allocated(context, method)
    if allocation is None:
        return None
    return hashlib.sha256(json.dumps(sorted(allocation.ranks.items())).encode()).hexdigest()


def unchanged_by_the_rank_bound(context: TaskContext, method: str) -> bool:
    """Whether a run logged before 2026-12 trained with the allocation sensilora gives now. Ranks were then
    capped at min(d_out, d_in) and are now capped lower, at d_out d_in / (d_out + d_in); where no matrix sits
    at the new cap, it never bound, the looser old one could not have either, and the allocation is the same."""
    from sensilora.allocation.budgets import largest_rank

    allocation = allocated(context, method)
    return allocation is None or all(
        rank < largest_rank(*allocation.shapes[name]) for name, rank in allocation.ranks.items()
    )


def trainable(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def parameter_counts(model) -> dict[str, int]:
    """The adapter as it ends (after any pruning) and, for HyperAdaLoRA, the hypernetwork generating it."""
    if isinstance(model, HyperAdaLoraModel):
        return {"adapter": adapter_parameters(model.peft_model), "hypernetwork": model.hypernetwork_parameters()}
    return {"adapter": adapter_parameters(model), "hypernetwork": 0}
