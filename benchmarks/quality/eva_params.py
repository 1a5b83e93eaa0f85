"""EVA's rank rule at uniform LoRA's trainable parameters (a comparison arm, not a sensilora rule).

peft's EVA (``get_eva_state_dict``, Paischer et al. 2024) computes, for every adapted matrix, the principal
components of its inputs (token activations under the attention mask, centred, as peft's IncrementalPCA),
pools every matrix's top ``rho r`` explained-variance ratios, and gives each matrix as many rank units as it
has among the ``r x (number of matrices)`` largest: it keeps the number of rank units, not of parameters. A
unit of a wider matrix costs more (``d_in + d_out`` parameters), so EVA's ranks can spend more than uniform
LoRA (8 % more on the held-out task). ``ranks_within`` takes the same units in the same order but only while
the parameters stay within a budget; with a cost of one per unit and a budget of ``r x (number of matrices)``
it is EVA's own count rule (up to peft's incremental PCA, which stops once its components converge).
"""

from __future__ import annotations

import dataclasses

import torch

from benchmarks.quality import methods as M


@torch.no_grad()
def explained_variance_ratios(model, names: list[str], batches, components: int) -> dict[str, torch.Tensor]:
    """{module name: its inputs' ``components`` largest explained-variance ratios, descending} (float64),
    over the tokens of ``batches`` (dicts of model inputs) whose attention mask is set; inputs are the
    (..., d_in) activations each module of ``names`` receives, centred over the tokens. (For a causal LM peft
    also drops tokens whose label is masked; the batches used here carry no labels.)"""
    sums, products, counts, handles = {}, {}, {}, []

    def hook(name):
        def accumulate(_module, inputs, _output):
            x = inputs[0][mask].double()  # (tokens, d_in)
            sums[name] = sums.get(name, 0) + x.sum(0)
            products[name] = products.get(name, 0) + x.T @ x
            counts[name] = counts.get(name, 0) + x.shape[0]

        return accumulate

    for name in names:
        handles.append(model.get_submodule(name).register_forward_hook(hook(name)))
    try:
        for batch in batches:
            mask = batch.get("attention_mask", torch.ones_like(batch["input_ids"])).bool()
            model(**batch)
    finally:
        for handle in handles:
            handle.remove()
    ratios = {}
    for name in names:
        mean = sums[name] / counts[name]
        covariance = products[name] / counts[name] - torch.outer(mean, mean)  # (d_in, d_in)
        eigenvalues = torch.linalg.eigvalsh(covariance).flip(0).clamp_min(0)
        ratios[name] = eigenvalues[:components] / eigenvalues.sum()
    return ratios


def ranks_within(ratios: dict[str, torch.Tensor], costs: dict[str, int], budget: int) -> dict[str, int]:
    """EVA's order under a budget: every matrix's units by explained-variance ratio, largest first (ties by
    name, then by the unit's index); a unit is taken where its ``costs[name]`` still fits in ``budget``.
    Returns {name: rank} (0 where a matrix gets no unit)."""
    units = sorted(((-float(value), name, index) for name, values in ratios.items() for index, value in
                    enumerate(values)))  # fmt: skip
    ranks, spent = dict.fromkeys(ratios, 0), 0
    for _negative_ratio, name, _index in units:
        if spent + costs[name] <= budget:
            ranks[name] += 1
            spent += costs[name]
    return ranks


def allocation(context, calibration):
    """EVA's rule at uniform LoRA's trainable parameters on a task (``context``: its base model and the
    paper's allocation, whose shapes and parameter count it takes; ``calibration``: the batches EVA reads):
    a RankAllocation of those ranks, marked rsLoRA (``confirm.build`` trains it with LoRA's initialisation,
    as EVA's ranks)."""
    template = context.allocations["paper"]
    shapes = template.shapes
    components = round(M.EVA_RHO * context.avg_rank)
    ratios = explained_variance_ratios(context.base, list(shapes), calibration, components)
    ranks = ranks_within(ratios, {n: sum(s) for n, s in shapes.items()}, template.uniform_parameters)
    return dataclasses.replace(template, ranks=ranks, config=template.config.replace(use_rslora=True))
