"""pytest-benchmark suite at CPU scale (CI runs it with --benchmark-disable so that it never rots)."""

import pytest
import torch
from sensilora import allocate, calibrate, ops

from benchmarks.cases import naive_hessian_diagonal
from tests.models import random_batches, tiny_llama


@pytest.fixture(scope="module")
def activations():
    return torch.randn(4, 256, 1536, generator=torch.Generator().manual_seed(0))


def test_column_sumsq(benchmark, activations):
    acc = torch.zeros(activations.shape[-1])
    benchmark(ops.column_sumsq_, acc, activations, None)
    assert torch.isfinite(acc).all()


def test_gram(benchmark, activations):
    gram = torch.zeros(576, 576)
    benchmark(ops.gram_, gram, activations[..., :576], None)
    assert torch.allclose(gram, gram.T)


def test_selection(benchmark):
    values = torch.rand(1536 * 576, generator=torch.Generator().manual_seed(1))
    result = benchmark(ops.topk_mean_and_effective_rank, values, torch.tensor([0, values.numel()]), None, 0.5, 0.85)
    assert 0 < int(result[2][0]) <= values.numel()


def test_naive_hessian_agrees(benchmark):
    x = torch.randn(512, 128, generator=torch.Generator().manual_seed(2))
    naive = benchmark(naive_hessian_diagonal, x)
    acc = torch.zeros(128)
    ops.column_sumsq_(acc, x, None)
    torch.testing.assert_close(naive, 2.0 / 512 * acc, rtol=1e-5, atol=1e-7)


def test_calibrate_and_allocate_tiny_model(benchmark):
    model, batches = tiny_llama(), random_batches()
    allocation = benchmark(lambda: allocate(calibrate(model, batches, progress=False), avg_rank=4))
    assert allocation.trainable_parameters <= allocation.uniform_parameters  # the default budget: LoRA's params
