"""The torch reference ops against first principles (autograd, linalg.inv, brute-force sorting)."""

import math

import pytest
import torch
from sensilora import SensiloraError, ops
from sensilora.ops import reference


def brute_force_selection(values, counts, k_frac, alpha):
    """Materialise the repeats, sort, and read METHOD.md's definitions (eqs. 8-10) off the sorted sequence."""
    expanded = torch.repeat_interleave(values.double(), counts).sort(descending=True).values
    m = expanded.numel()
    k = max(1, math.ceil(k_frac * m))
    total = expanded.sum()
    if total == 0:
        return float(total), float(expanded[:k].mean()), 0
    cumulative = torch.cumsum(expanded, 0)
    effective = int((cumulative >= alpha * total).nonzero()[0]) + 1
    return float(total), float(expanded[:k].mean()), effective


def test_column_sumsq_is_the_autograd_hessian_diagonal():
    """h_j = (2/N) sum x_nj^2 is the diagonal of the Hessian of (1/N) sum_n ||(W - W0) x_n||^2."""
    torch.manual_seed(0)
    x = torch.randn(13, 5, dtype=torch.float64)
    w0 = torch.randn(3, 5, dtype=torch.float64)

    def layer_loss(flat_w):
        return ((x @ (flat_w.view(3, 5) - w0).T) ** 2).sum() / x.shape[0]

    hessian = torch.autograd.functional.hessian(layer_loss, w0.flatten().clone())
    acc = torch.zeros(5)
    ops.column_sumsq_(acc, x.float())
    statistic = 2.0 / x.shape[0] * acc
    for row in hessian.diagonal().view(3, 5):  # identical for every output row
        torch.testing.assert_close(statistic.double(), row, rtol=1e-6, atol=1e-7)


def test_column_sumsq_and_gram_exclude_masked_rows():
    torch.manual_seed(1)
    x = torch.randn(2, 7, 6, dtype=torch.bfloat16)
    mask = torch.rand(2, 7) > 0.4
    acc, gram = torch.zeros(6), torch.zeros(6, 6)
    ops.column_sumsq_(acc, x, mask)
    ops.gram_(gram, x, mask)
    real = x[mask].float()
    torch.testing.assert_close(acc, (real**2).sum(0))
    torch.testing.assert_close(gram, real.T @ real)
    weight = torch.rand(2, 7) * 3  # per-token weights (the loss-aware statistic's ||dL/dy||^2)
    weighted = torch.zeros(6)
    ops.column_sumsq_(weighted, x, mask, weight)
    expected = torch.stack([w * row.float() ** 2 for row, w, m in zip(x.flatten(0, 1), weight.flatten(), mask.flatten())
                            if m]).sum(0)  # fmt: skip
    torch.testing.assert_close(weighted, expected)


def test_inverse_diagonal_equals_linalg_inv_of_damped_matrix():
    torch.manual_seed(2)
    a = torch.randn(3, 40, 9, dtype=torch.float64)
    hessian = a.mT @ a / 40
    inverse, damps = ops.inverse_diagonal(hessian.float(), 0.01)
    damped = hessian + 0.01 * hessian.diagonal(dim1=-2, dim2=-1).mean(-1)[:, None, None] * torch.eye(
        9, dtype=torch.float64
    )
    torch.testing.assert_close(
        inverse.double(), torch.linalg.inv(damped).diagonal(dim1=-2, dim2=-1), rtol=1e-4, atol=1e-6
    )
    assert damps.tolist() == pytest.approx([0.01] * 3)


def test_inverse_diagonal_dead_columns_and_escalation():
    torch.manual_seed(3)
    a = torch.randn(30, 6)
    a[:, 2] = 0  # a dead column
    hessian = a.T @ a
    inverse, _ = ops.inverse_diagonal(hessian, 0.01)
    fixed = hessian.clone()
    fixed[2, 2] = 1
    damped = fixed + 0.01 * fixed.diagonal().mean() * torch.eye(6)
    torch.testing.assert_close(inverse, torch.linalg.inv(damped).diagonal(), rtol=1e-4, atol=1e-6)
    # an indefinite matrix needs more damping: the op escalates tenfold until Cholesky succeeds
    indefinite = torch.diag(torch.tensor([1.0, 1.0, -0.05]))
    inverse, damp = ops.inverse_diagonal(indefinite, 0.01)
    assert float(damp) == pytest.approx(0.1)
    shift = 0.1 * indefinite.diagonal().mean()
    torch.testing.assert_close(inverse, 1.0 / (indefinite.diagonal() + shift))
    with pytest.raises(SensiloraError, match="not positive definite"):
        ops.inverse_diagonal(torch.diag(torch.tensor([1.0, 1.0, -100.0])), 0.01)


@pytest.mark.parametrize("k_frac,alpha", [(0.5, 0.85), (1 / 3, 0.8), (1.0, 1.0), (0.01, 0.01)])
def test_selection_matches_brute_force(k_frac, alpha):
    generator = torch.Generator().manual_seed(4)
    lengths = [1, 7, 30, 64]
    values = torch.rand(sum(lengths), generator=generator)
    values[3:6] = 0.5  # ties
    values[10:14] = 0.0  # zeros
    values[40:44] = values[44]  # ties across the middle
    counts = torch.randint(1, 5, values.shape, generator=generator)
    offsets = torch.cumsum(torch.tensor([0] + lengths), 0)
    totals, means, ranks = ops.topk_mean_and_effective_rank(values, offsets, counts, k_frac, alpha)
    for s in range(len(lengths)):
        a, b = int(offsets[s]), int(offsets[s + 1])
        total, mean, rank = brute_force_selection(values[a:b], counts[a:b], k_frac, alpha)
        assert float(totals[s]) == pytest.approx(total, rel=1e-12)
        assert float(means[s]) == pytest.approx(mean, rel=1e-12)
        assert int(ranks[s]) == rank


def test_selection_all_zero_segment_and_bad_arguments():
    values, offsets = torch.zeros(4), torch.tensor([0, 4])
    totals, means, ranks = ops.topk_mean_and_effective_rank(values, offsets, None, 0.5, 0.85)
    assert (float(totals[0]), float(means[0]), int(ranks[0])) == (0.0, 0.0, 0)
    for k_frac, alpha in [(0.0, 0.5), (0.5, 1.5), (-1, 0.5)]:
        with pytest.raises(SensiloraError, match="must be in"):
            ops.topk_mean_and_effective_rank(values, offsets, None, k_frac, alpha)


def test_saliency_selection_matches_materialised():
    torch.manual_seed(5)
    weight, inverse = torch.randn(5, 8), torch.rand(8) + 0.1
    s = (weight * weight * (1 / inverse)).flatten()  # the defined rounding: two fp32 products
    torch.testing.assert_close(s, (weight**2 / inverse).flatten(), rtol=2.4e-7, atol=0)  # within 2 ulp of w^2 / h
    expected = brute_force_selection(s, torch.ones_like(s, dtype=torch.long), 0.5, 0.85)
    got = ops.saliency_topk_mean_and_effective_rank(weight, inverse, 0.5, 0.85)
    assert [float(got[0][0]), float(got[1][0]), int(got[2][0])] == pytest.approx(list(expected), rel=1e-9)


def test_ops_pass_opcheck():
    torch.manual_seed(6)
    x, mask = torch.randn(2, 5, 6), torch.rand(2, 5) > 0.3
    torch.library.opcheck(torch.ops.sensilora.column_sumsq_, (torch.zeros(6), x, mask))
    torch.library.opcheck(torch.ops.sensilora.column_sumsq_, (torch.zeros(6), x, mask, torch.rand(2, 5)))
    torch.library.opcheck(torch.ops.sensilora.gram_, (torch.zeros(6, 6), x, mask))
    a = torch.randn(20, 4)
    torch.library.opcheck(torch.ops.sensilora.inverse_diagonal, (a.T @ a, 0.01))
    values, offsets = torch.rand(9), torch.tensor([0, 4, 9])
    torch.library.opcheck(torch.ops.sensilora.topk_mean_and_effective_rank, (values, offsets, None, 0.5, 0.85))


def test_reference_topk_count_rounds_up():
    assert reference.topk_count(torch.tensor([1, 2, 3, 7]), 0.5).tolist() == [1, 1, 2, 4]


def test_ops_compose_with_torch_compile():
    """The custom ops trace into a full graph (aot_eager: graph capture without C++ codegen)."""
    x, mask = torch.randn(2, 5, 6), torch.rand(2, 5) > 0.3

    def statistics(x, mask):
        acc = torch.zeros(x.shape[-1])
        torch.ops.sensilora.column_sumsq_(acc, x * 2.0, mask)
        return acc

    compiled = torch.compile(statistics, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(x, mask), statistics(x, mask))
    hessian = torch.randn(20, 4)
    hessian = hessian.T @ hessian
    compiled_inverse = torch.compile(
        lambda h: torch.ops.sensilora.inverse_diagonal(h, 0.01)[0] * 1.0, backend="aot_eager", fullgraph=True
    )
    torch.testing.assert_close(compiled_inverse(hessian), ops.inverse_diagonal(hessian, 0.01)[0])
