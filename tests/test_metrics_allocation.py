"""Metrics against brute force; allocation properties (hypothesis) and METHOD.md's examples."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from sensilora import (
    ModuleMetrics,
    SensiloraError,
    allocate,
    calibrate,
    combine,
    compute_metrics,
    pra_ranks,
    sra_ranks,
)
from sensilora.calibration.targets import linear_weight

from tests.models import random_batches, tiny_llama
from tests.test_ops_reference import brute_force_selection


@pytest.mark.parametrize("k_frac,alpha", [(0.5, 0.85), (1 / 3, 0.8)])
def test_diag_metrics_equal_materialised_sort(k_frac, alpha):
    stats = calibrate(tiny_llama(), random_batches(), progress=False)
    metrics = compute_metrics(stats, k_frac, alpha)
    for name in stats.module_names:
        d_out, d_in = stats.module_shapes[name]
        h = stats.hessian_diag(name)
        total, mean, rank = brute_force_selection(h, torch.full((d_in,), d_out), k_frac, alpha)
        got = metrics[name]
        assert got.global_sensitivity == pytest.approx(total, rel=1e-9)
        assert got.topk == pytest.approx(mean, rel=1e-9)
        assert got.effective_rank == rank


def test_obs_metrics_equal_materialised_sort():
    model = tiny_llama()
    stats = calibrate(model, random_batches(), mode="obs", progress=False)
    metrics = compute_metrics(stats, model=model)
    modules = dict(model.named_modules())
    for name in stats.module_names:
        w = linear_weight(modules[name]).detach()
        s = (w * w * (1 / stats.inverse_hessian_diag(name))).flatten()  # METHOD.md's rounding of w^2 / h_jj
        total, mean, rank = brute_force_selection(s, torch.ones_like(s, dtype=torch.long), 0.5, 0.85)
        assert metrics[name].global_sensitivity == pytest.approx(total, rel=1e-9)
        assert metrics[name].topk == pytest.approx(mean, rel=1e-9)
        assert metrics[name].effective_rank == rank
    with pytest.raises(SensiloraError, match="need the weights"):
        compute_metrics(stats)


def test_combination_follows_equations():
    metrics = {
        "a": ModuleMetrics(10.0, 2.0, 5),
        "b": ModuleMetrics(20.0, 1.0, 9),
        "c": ModuleMetrics(60.0, 4.0, 2),
    }
    g, t, e = (np.array(v, dtype=float) for v in ([10, 20, 60], [2, 1, 4], [5, 9, 2]))
    cv = lambda v: v.std() / v.mean() ** 2  # noqa: E731
    local = cv(t) * t + cv(e) * e
    expected = cv(g) * g + cv(local) * local
    assert list(combine(metrics).values()) == pytest.approx(expected.tolist())
    assert list(combine(metrics, "global").values()) == pytest.approx(g.tolist())
    assert list(combine(metrics, "local").values()) == pytest.approx(local.tolist())
    eq_local = 0.5 / t.mean() * t + 0.5 / e.mean() * e
    expected_equal = 0.5 / g.mean() * g + 0.5 / eq_local.mean() * eq_local
    assert list(combine(metrics, weighting="equal").values()) == pytest.approx(expected_equal.tolist())


def test_pra_example_from_spec():
    theta = {f"m{i}": float(6 - i) for i in range(6)}
    shapes = {name: (64, 64) for name in theta}
    assert list(pra_ranks(theta, shapes, avg_rank=5, groups=3).values()) == [6, 6, 5, 5, 4, 4]


shapes_strategy = st.lists(
    st.tuples(st.floats(0, 1e6, allow_nan=False), st.integers(2, 64), st.integers(2, 64)), min_size=1, max_size=25
)


@settings(max_examples=150, deadline=None)
@given(shapes_strategy, st.integers(1, 8), st.integers(1, 2), st.sampled_from(["ranks", "params"]))
def test_sra_properties(items, avg_rank, min_rank, budget):
    names = [f"layer.{i}.proj" for i in range(len(items))]
    theta = {n: item[0] for n, item in zip(names, items)}
    shapes = {n: (item[1], item[2]) for n, item in zip(names, items)}
    cost = {n: (sum(shapes[n]) if budget == "params" else 1) for n in names}
    total = avg_rank * sum(cost.values())
    largest = {n: max(1, shapes[n][0] * shapes[n][1] // sum(shapes[n])) for n in names}  # adapter <= weight
    feasible = all(min_rank <= largest[n] for n in names) and (
        sum(cost[n] * min_rank for n in names) <= total <= sum(cost[n] * largest[n] for n in names)
    )
    if not feasible:
        with pytest.raises(SensiloraError):
            sra_ranks(theta, shapes, avg_rank, min_rank, budget)
        return
    ranks = sra_ranks(theta, shapes, avg_rank, min_rank, budget)
    spent = sum(cost[n] * ranks[n] for n in names)
    if budget == "ranks":
        assert spent == total  # exact integer budget
    else:
        assert spent <= total
    assert all(min_rank <= ranks[n] <= largest[n] for n in names)  # bounds
    assert all(ranks[n] * sum(shapes[n]) <= max(sum(shapes[n]), shapes[n][0] * shapes[n][1]) for n in names)
    for a in names:  # monotone in theta among matrices with the same bounds
        for b in names:
            if shapes[a] == shapes[b] and theta[a] > theta[b]:
                assert ranks[a] >= ranks[b]
    assert sra_ranks(dict(reversed(list(theta.items()))), shapes, avg_rank, min_rank, budget) == ranks  # deterministic


def test_sra_redistributes_clamped_surplus_and_breaks_ties_by_name():
    shapes = {"a": (4, 4), "b": (64, 64), "c": (64, 64)}
    ranks = sra_ranks({"a": 100.0, "b": 1.0, "c": 1.0}, shapes, avg_rank=6)
    # a 4x4 weight's adapter stops at 4*4 // (4+4) = 2 (past that it costs more than the weight itself)
    assert ranks == {"a": 2, "b": 8, "c": 8}
    tied = sra_ranks({"x": 1.0, "y": 1.0, "z": 1.0}, {n: (64, 64) for n in "xyz"}, avg_rank=1, min_rank=1)
    assert tied == {"x": 1, "y": 1, "z": 1}
    assert sra_ranks({"y": 1.0, "x": 1.0}, {"x": (8, 8), "y": (8, 8)}, avg_rank=1) == {"y": 1, "x": 1}
    odd = sra_ranks({"y": 1.0, "x": 1.0, "w": 0.0}, {n: (8, 8) for n in "xyw"}, avg_rank=2)
    assert odd == {"y": 2, "x": 3, "w": 1}  # the tie for the last unit goes to the first name


def test_allocate_errors_and_params_budget():
    model = tiny_llama()
    stats = calibrate(model, random_batches(), progress=False)
    with pytest.raises(SensiloraError, match="min_rank"):
        allocate(stats, avg_rank=1, min_rank=2)
    with pytest.raises(SensiloraError, match="alpha"):
        allocate(stats, avg_rank=4, alpha=0.0)
    with pytest.raises(SensiloraError, match="k_frac"):
        allocate(stats, avg_rank=4, k_frac=1.5)
    with pytest.raises(SensiloraError, match="method"):
        allocate(stats, avg_rank=4, method="adalora")
    allocation = allocate(stats, avg_rank=4, budget="params")
    assert allocation.trainable_parameters <= allocation.uniform_parameters
    assert allocation.trainable_parameters > 0.95 * allocation.uniform_parameters
    capped = allocate(stats, avg_rank=4, max_rank=6, budget="ranks")
    assert max(capped.ranks.values()) <= 6 and sum(capped.ranks.values()) == 4 * len(capped.ranks)
    assert math.isfinite(sum(allocation.theta.values()))
