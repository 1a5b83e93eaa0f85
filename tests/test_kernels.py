"""sensilora_kernels against the torch reference: Triton under TRITON_INTERPRET=1 on the CPU here,
the same comparisons at real sizes on a GPU (marked ``gpu``)."""

import functools
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")
pytestmark = pytest.mark.interpreter  # the CPU tests run Triton under TRITON_INTERPRET (conftest)

from sensilora.ops import reference  # noqa: E402

from sensilora_kernels.radix_select import make_saliency_selection, make_selection  # noqa: E402
from sensilora_kernels.registry import available_kernels  # noqa: E402
from sensilora_kernels.triton_backend import column_sumsq, gram, inverse_diagonal, selection  # noqa: E402  (after TRITON_INTERPRET)
from tests.kernel_cases import (  # noqa: E402
    DTYPES,
    ROWS,
    SELECTION_CASES,
    SELECTION_TARGETS,
    TOLERANCE,
    assert_same_selection,
    assert_selects_every_binade,
    make_input,
    make_mask,
    make_rows,
    saliency_case,
    selection_case,
)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1, 1), (3, 37, 70), (2, 5, 130)])
@pytest.mark.parametrize("layout", ["contiguous", "transposed", "strided"])
@pytest.mark.parametrize("rows", ROWS)
def test_column_sumsq(dtype, shape, layout, rows):
    x = make_input(shape, dtype, layout)
    mask, weight = make_rows(shape, rows)
    got, expected = torch.zeros(shape[-1]), torch.zeros(shape[-1])
    column_sumsq.column_sumsq_(got, x, mask, weight)
    reference.column_sumsq_(expected, x, mask, weight)
    torch.testing.assert_close(got, expected, rtol=TOLERANCE[dtype], atol=1e-6)


def test_column_sumsq_any_leading_dims():
    x = torch.randn(2, 3, 4, 9)
    got, expected = torch.zeros(9), torch.zeros(9)
    column_sumsq.column_sumsq_(got, x, torch.ones(2, 3, 4, dtype=torch.bool))
    reference.column_sumsq_(expected, x)
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(  # contiguous wide layers take the GPU's large tiles (gram.launch_config)
    "shape,layout",
    [((1, 3, 1), "contiguous"), ((2, 19, 17), "transposed"), ((3, 23, 70), "transposed"), ((2, 9, 130), "contiguous")],
)
@pytest.mark.parametrize("masked", [False, True])
def test_gram(dtype, shape, layout, masked):
    x = make_input(shape, dtype, layout, seed=2)
    mask = make_mask(shape, seed=3) if masked else None
    got, expected = torch.zeros(shape[-1], shape[-1]), torch.zeros(shape[-1], shape[-1])
    gram.gram_(got, x, mask)
    reference.gram_(expected, x, mask)
    torch.testing.assert_close(got, expected, rtol=TOLERANCE[dtype], atol=1e-4)
    # symmetric up to rounding: diagonal tiles are x_i^T x_i from tl.dot, which (like the reference's BLAS)
    # need not sum (i, j) and (j, i) in the same order; Cholesky reads only the lower triangle anyway
    torch.testing.assert_close(got, got.T, rtol=TOLERANCE[dtype], atol=1e-4)


def test_inverse_diagonal_batched_with_dead_columns_and_escalation():
    a = torch.randn(3, 40, 21, generator=torch.Generator().manual_seed(4))
    a[1, :, 5] = 0
    hessians = a.mT @ a / 40
    hessians[2] = torch.diag(torch.linspace(1.0, 2.0, 21)) - 0.2 * torch.eye(21) * (torch.arange(21) == 0)
    hessians[2, 0, 0] = -0.05
    got, got_damp = inverse_diagonal.inverse_diagonal(hessians, 0.01)
    expected, expected_damp = reference.inverse_diagonal(hessians, 0.01)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(got_damp, expected_damp)
    assert float(got_damp[2]) > 0.01  # the indefinite one needed more damping


@pytest.mark.parametrize("lengths,with_counts,ties", SELECTION_CASES)
@pytest.mark.parametrize("k_frac,alpha", SELECTION_TARGETS)
def test_selection_equals_sorted_reference(lengths, with_counts, ties, k_frac, alpha):
    values, offsets, counts = selection_case(lengths, seed=len(lengths), with_counts=with_counts, ties=ties)
    got = selection.topk_mean_and_effective_rank(values, offsets, counts, k_frac, alpha)
    expected = reference.topk_mean_and_effective_rank(values, offsets, counts, k_frac, alpha)
    assert_same_selection(got, expected)


@pytest.mark.parametrize("with_counts", [False, True])
def test_selection_over_every_binade(with_counts):
    assert_selects_every_binade(selection.topk_mean_and_effective_rank, with_counts)


def test_selection_all_zeros_and_single_value():
    values, offsets = torch.tensor([0.0, 0.0, 0.0, 2.5]), torch.tensor([0, 3, 4])
    got = selection.topk_mean_and_effective_rank(values, offsets, None, 0.5, 0.85)
    expected = reference.topk_mean_and_effective_rank(values, offsets, None, 0.5, 0.85)
    for g, e in zip(got, expected):
        assert torch.equal(g.double(), e.double())


@pytest.mark.parametrize("transposed", [False, True])
def test_fused_saliency_selection(transposed):
    weight, inverse = saliency_case(33, 19, transposed)
    got = selection.saliency_topk_mean_and_effective_rank(weight, inverse, 0.5, 0.85)
    expected = reference.saliency_topk_mean_and_effective_rank(weight, inverse, 0.5, 0.85)
    assert_same_selection(got, expected)


def test_selection_in_gpu_sized_chunks():
    """The GPU's chunk loop (CHUNK elements a step; the interpreter defaults to one step a block)."""
    values, offsets, counts = selection_case([3, 2500, 1100], seed=5)
    flat = make_selection(
        functools.partial(selection._triton_histogram, chunk=selection.CHUNK), selection.BLOCK, selection.WIDTHS
    )
    got = flat(values, offsets, counts, 0.5, 0.85)
    expected = reference.topk_mean_and_effective_rank(values, offsets, counts, 0.5, 0.85)
    assert_same_selection(got, expected)
    weight = torch.randn(40, 30, generator=torch.Generator().manual_seed(6)).T  # non-contiguous
    inverse = torch.rand(40, generator=torch.Generator().manual_seed(7)) + 0.05
    fused = make_saliency_selection(
        functools.partial(selection._triton_saliency_histogram, chunk=selection.CHUNK),
        selection.BLOCK,
        selection.WIDTHS,
    )
    got = fused(weight, inverse, 1 / 3, 0.8)
    expected = reference.saliency_topk_mean_and_effective_rank(weight, inverse, 1 / 3, 0.8)
    assert_same_selection(got, expected)


# ----------------------------------------------------------------------------------------------
# GPU: the same comparisons at LLaMA-3.1-8B sizes (skipped without CUDA).


@pytest.mark.gpu
@pytest.mark.parametrize("d", [4096, 14336])
@pytest.mark.parametrize("name", ["triton", "cuda"])
def test_gpu_column_sumsq_real_size(cuda_device, d, name):
    implementation = available_kernels()[0].get(name, {})
    if "column_sumsq_" not in implementation:
        pytest.skip(f"backend {name} is not available")
    x = torch.randn(8, 2048, d, device=cuda_device, dtype=torch.bfloat16)
    mask = torch.rand(8, 2048, device=cuda_device) > 0.1
    got, expected = torch.zeros(d, device=cuda_device), torch.zeros(d, device=cuda_device)
    implementation["column_sumsq_"](got, x, mask)
    reference.column_sumsq_(expected, x, mask)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-3)


@pytest.mark.gpu
def test_gpu_gram_and_inverse_real_size(cuda_device):
    x = torch.randn(2, 2048, 4096, device=cuda_device, dtype=torch.bfloat16)
    got, expected = torch.zeros(4096, 4096, device=cuda_device), torch.zeros(4096, 4096, device=cuda_device)
    gram.gram_(got, x)
    reference.gram_(expected, x)
    torch.testing.assert_close(got, expected, rtol=1e-3, atol=1e-1)
    hessian = (expected / 4096)[None, :1024, :1024]
    torch.testing.assert_close(
        inverse_diagonal.inverse_diagonal(hessian)[0], reference.inverse_diagonal(hessian)[0], rtol=1e-3, atol=1e-6
    )


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["triton", "cuda"])
def test_gpu_selection_real_size(cuda_device, name):
    implementation = available_kernels()[0].get(name, {})
    if "topk_mean_and_effective_rank" not in implementation:
        pytest.skip(f"backend {name} is not available")
    weight = torch.randn(14336, 4096, device=cuda_device, dtype=torch.bfloat16)
    inverse = torch.rand(4096, device=cuda_device) + 0.01
    values = reference.saliency(weight, inverse).reshape(-1)
    offsets = torch.tensor([0, values.numel()], device=cuda_device)
    got = implementation["topk_mean_and_effective_rank"](values, offsets, None, 0.5, 0.85)
    expected = reference.topk_mean_and_effective_rank(values, offsets, None, 0.5, 0.85)
    torch.testing.assert_close(got[1], expected[1], rtol=1e-9, atol=0)
    assert torch.equal(got[2].cpu(), expected[2].cpu())
    fused = implementation["saliency_topk_mean_and_effective_rank"](weight, inverse, 0.5, 0.85)
    torch.testing.assert_close(fused[1], expected[1], rtol=1e-9, atol=0)
    assert torch.equal(fused[2].cpu(), expected[2].cpu())
    # every value in one 1/8-binade bucket: the CUDA selection compacts all 5.9e7 of them
    clustered = 1.0 + torch.rand(values.numel(), device=cuda_device) / 16
    got = implementation["topk_mean_and_effective_rank"](clustered, offsets, None, 0.5, 0.85)
    expected = reference.topk_mean_and_effective_rank(clustered, offsets, None, 0.5, 0.85)
    torch.testing.assert_close(got[1], expected[1], rtol=1e-9, atol=0)
    assert torch.equal(got[2].cpu(), expected[2].cpu())


AOT_PYTHONS = [sys.executable] + (
    [os.environ["SENSILORA_AOT_PYTHON"]] if os.environ.get("SENSILORA_AOT_PYTHON") else []
)


@pytest.mark.interpreter(needed=False)
@pytest.mark.parametrize("python", AOT_PYTHONS)
def test_triton_kernels_compile_for_hopper(python):
    """Every kernel variant lowers to a cubin for sm_90 (no GPU needed); see tests/triton_aot.py. Also under
    a second interpreter named by SENSILORA_AOT_PYTHON: CI makes a venv with the GPU machine's Triton (3.6),
    whose register allocation differs."""
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "SENSILORA_BACKEND")}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    script = Path(__file__).parent / "triton_aot.py"
    result = subprocess.run([python, str(script)], env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    from tests import triton_aot

    assert result.stdout.count("OK ") == len(list(triton_aot.cases())) == 33
