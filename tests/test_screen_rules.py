"""The screen's allocation rules (benchmarks/quality/rules.py) against direct computations."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from sensilora.allocation.budgets import largest_rank
from sensilora.allocation.rules import depth_and_type

from benchmarks.quality import rules as R

SHAPES = {
    "model.layers.0.self_attn.q_proj": (12, 8),
    "model.layers.0.mlp.down_proj": (8, 20),
    "model.layers.1.self_attn.q_proj": (12, 8),
    "model.layers.1.mlp.down_proj": (8, 20),
    "model.layers.2.self_attn.q_proj": (12, 8),
    "model.layers.2.mlp.down_proj": (8, 20),
}


def spent(ranks, shapes=SHAPES):
    return sum(ranks[n] * sum(shapes[n]) for n in shapes)


def test_depth_and_type():
    assert depth_and_type("model.layers.11.mlp.down_proj") == (11, "mlp.down_proj")
    assert depth_and_type("bert.encoder.layer.3.attention.self.query") == (3, "attention.self.query")
    assert depth_and_type("lm_head") == (0, "lm_head")


def test_greedy_equals_brute_force_at_equal_costs():
    """With equal costs and non-increasing values, greedy is optimal: compare with every allocation."""
    generator = np.random.default_rng(0)
    shapes = {f"m{i}": (6, 6) for i in range(3)}  # largest rank 3 each
    for _ in range(20):
        values = {n: np.sort(generator.exponential(size=3))[::-1] for n in shapes}
        ranks = R.greedy_ranks(values, shapes, avg_rank=2)
        assert spent(ranks, shapes) == R.parameter_budget(shapes, 2)
        best = max(
            (dict(zip(shapes, combo)) for combo in itertools.product((1, 2, 3), repeat=3) if sum(combo) == 6),
            key=lambda r: sum(values[n][: r[n]].sum() for n in shapes),
        )
        total = lambda r: sum(values[n][: r[n]].sum() for n in shapes)  # noqa: E731
        assert total(ranks) == pytest.approx(total(best))


def test_greedy_respects_budget_and_bounds():
    generator = np.random.default_rng(1)
    values = {
        n: np.sort(generator.exponential(size=min(s)))[::-1] * (10 if "down" in n else 1) for n, s in SHAPES.items()
    }
    ranks = R.greedy_ranks(values, SHAPES, avg_rank=3)
    assert spent(ranks) <= R.parameter_budget(SHAPES, 3)
    assert all(1 <= ranks[n] <= largest_rank(*SHAPES[n]) for n in SHAPES)
    assert all(ranks[n] >= ranks[n.replace("mlp.down_proj", "self_attn.q_proj")] for n in SHAPES if "down" in n)


def test_captured_is_the_held_share():
    energies = {"a": np.array([4.0, 2.0, 1.0]), "b": np.array([3.0, 0.0])}
    assert R.captured({"a": 1, "b": 2}, energies) == pytest.approx(7.0 / 10.0)
    assert R.captured({"a": 3, "b": 2}, energies) == pytest.approx(1.0)


def test_whitened_spectrum_against_numpy():
    generator = torch.Generator().manual_seed(0)
    delta, h = torch.randn(7, 5, generator=generator), torch.rand(5, generator=generator) + 0.1
    got = R.whitened_spectrum(delta, h, 0.5)
    expected = np.linalg.svd(delta.double().numpy() * np.sqrt(h.double().numpy())[None, :], compute_uv=False) ** 2
    np.testing.assert_allclose(got, expected, rtol=1e-5)
    # its total is the whitened Frobenius energy tr(dW diag(h) dW^T)
    assert got.sum() == pytest.approx(float((delta.double() ** 2 * h.double()).sum()), rel=1e-5)


def test_gradient_spectrum_is_the_best_rank_k_reduction():
    """The best rank-k step of <G, D> + 1/2 ||D diag(h)^1/2||^2 lowers it by 1/2 sum_{i<=k} sigma_i^2."""
    generator = torch.Generator().manual_seed(2)
    gradient = torch.randn(6, 9, generator=generator, dtype=torch.float64)
    h = torch.rand(9, generator=generator, dtype=torch.float64) + 0.2
    values = R.whitened_spectrum(gradient, h, -0.5)
    u, s, vh = torch.linalg.svd(gradient * h.rsqrt()[None, :], full_matrices=False)
    for k in (1, 3):
        step = -(u[:, :k] * s[:k]) @ vh[:k] * h.rsqrt()[None, :]
        model = float((gradient * step).sum() + 0.5 * (step**2 * h).sum())
        assert -model == pytest.approx(0.5 * values[:k].sum(), rel=1e-5)
        for _ in range(5):  # moving within the optimum's row space (whitened) only costs
            push = torch.randn(6, k, generator=generator, dtype=torch.float64) @ vh[:k] * h.rsqrt()[None, :]
            other = step + 1e-2 * push
            assert float((gradient * other).sum() + 0.5 * (other**2 * h).sum()) >= model


def test_gradient_spectrum_damps_dead_columns():
    gradient, h = torch.ones(1, 3), torch.tensor([0.0, 2.0, 4.0])  # damped: h + 0.01 * 2 = [0.02, 2.02, 4.02]
    (value,) = R.gradient_spectrum_values({"m": gradient}, {"m": h})["m"]
    assert value == pytest.approx(1 / 0.02 + 1 / 2.02 + 1 / 4.02, rel=1e-5)


def test_gora_ranks_bounds_and_order():
    generator = torch.Generator().manual_seed(3)
    weights = {n: torch.randn(s, generator=generator) for n, s in SHAPES.items()}
    gradients = {n: torch.randn(s, generator=generator) * (i + 1) for i, (n, s) in enumerate(SHAPES.items())}
    ranks = R.gora_ranks(weights, gradients, SHAPES, avg_rank=4)
    assert all(2 <= r <= min(16, largest_rank(*SHAPES[n])) for n, r in ranks.items())
    assert spent(ranks) <= R.parameter_budget(SHAPES, 4)
    importance = {n: float((weights[n] * gradients[n]).abs().mean()) for n in SHAPES}
    same_shape = [n for n in SHAPES if "q_proj" in n]
    by_importance = sorted(same_shape, key=importance.get)
    assert [ranks[n] for n in by_importance] == sorted(ranks[n] for n in by_importance)


def test_structural_ranks_rise_with_depth():
    ranks = R.structural_ranks(SHAPES, avg_rank=3)
    for kind in ("self_attn.q_proj", "mlp.down_proj"):
        column = [ranks[f"model.layers.{d}.{kind}"] for d in range(3)]
        assert column == sorted(column) and column[0] < column[-1]
    assert spent(ranks) <= R.parameter_budget(SHAPES, 3)


def test_pooled_ranks_share_one_rank_per_group():
    shapes = {f"model.layers.{d}.mlp.up_proj": (32, 32) for d in range(6)}
    theta = {n: float(i) for i, n in enumerate(shapes)}  # groups of depth thirds: (0, 1), (2, 3), (4, 5)
    ranks = R.pooled_ranks(theta, shapes, avg_rank=3)
    values = list(ranks.values())
    assert values[0] == values[1] and values[2] == values[3] and values[4] == values[5]
    assert values[0] < values[2] < values[4]


def test_stability_measures():
    a, b = {"x": 1, "y": 2, "z": 3}, {"x": 1, "y": 3, "z": 2}
    shapes = dict.fromkeys(a, (2, 2))
    assert R.spearman(a, a) == pytest.approx(1.0)
    assert R.spearman(a, b) == pytest.approx(0.5)
    assert R.shared_parameters(a, a, shapes) == pytest.approx(1.0)
    assert R.shared_parameters(a, b, shapes) == pytest.approx(5 / 6)
