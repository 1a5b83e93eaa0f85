"""csrc/'s CUDA kernels against the torch reference without a GPU: built with g++ over a host shim that
runs each CUDA thread on a CPU thread (tests/cuda_emulation/), called as csrc/bindings.cpp calls them.
This checks the kernels' indexing, strides, masks, dtypes and the selection's exactness; the GPU tests
in test_kernels.py check the real build."""

import pytest
import torch
from sensilora.ops import reference

from sensilora_kernels.cuda import CUDA_SELECTION_BLOCK, CUDA_WIDTHS
from sensilora_kernels.radix_select import block_table, make_saliency_selection, make_selection
from tests.cuda_emulation import emulated
from tests.kernel_cases import (
    DTYPES,
    ROWS,
    SELECTION_CASES,
    SELECTION_TARGETS,
    TOLERANCE,
    assert_same_selection,
    assert_selects_every_binade,
    make_input,
    make_rows,
    saliency_case,
    selection_case,
)

BLOCKS = [CUDA_SELECTION_BLOCK, 1000]  # the production block, and one that splits segments


def flat_selection(library, block):
    """The CUDA backend's flat selection (3 passes, the second compacting) over the emulated kernels."""
    return make_selection(emulated.radix_histogram(library), block, CUDA_WIDTHS, compacts=True)


def fused_selection(library, block):
    """The CUDA backend's fused obs selection over the emulated kernels."""
    flat = emulated.radix_histogram(library)
    return make_saliency_selection(emulated.saliency_histogram(library), block, CUDA_WIDTHS, flat)


@pytest.fixture(scope="module")
def library(tmp_path_factory):
    try:
        return emulated.build(tmp_path_factory.mktemp("csrc_emulated"))
    except RuntimeError as error:
        if "needs g++" in str(error):
            pytest.skip(f"csrc host emulation: {error}")
        raise


@pytest.mark.parametrize("dtype", DTYPES)
# (2, 9, 64) contiguous takes the 16-byte vector path (d and the strides multiples of 16 bytes' elements)
@pytest.mark.parametrize("shape,splits", [((1, 1, 1), 1), ((3, 37, 70), 4), ((2, 5, 130), 3), ((2, 9, 64), 3)])
@pytest.mark.parametrize("layout", ["contiguous", "transposed", "strided"])
@pytest.mark.parametrize("rows", ROWS)
def test_column_sumsq(library, dtype, shape, splits, layout, rows):
    x = make_input(shape, dtype, layout)
    mask, weight = make_rows(shape, rows)
    got, expected = torch.ones(shape[-1]), torch.ones(shape[-1])  # accumulates into what is there
    emulated.column_sumsq_(library, got, x, mask, splits, weight)
    reference.column_sumsq_(expected, x, mask, weight)
    torch.testing.assert_close(got, expected, rtol=TOLERANCE[dtype], atol=1e-6)


@pytest.mark.parametrize("block", BLOCKS)
@pytest.mark.parametrize("lengths,with_counts,ties", SELECTION_CASES)
@pytest.mark.parametrize("k_frac,alpha", SELECTION_TARGETS)
def test_selection_equals_sorted_reference(library, block, lengths, with_counts, ties, k_frac, alpha):
    values, offsets, counts = selection_case(lengths, seed=len(lengths), with_counts=with_counts, ties=ties)
    got = flat_selection(library, block)(values, offsets, counts, k_frac, alpha)
    expected = reference.topk_mean_and_effective_rank(values, offsets, counts, k_frac, alpha)
    assert_same_selection(got, expected)


@pytest.mark.parametrize("with_counts", [False, True])
def test_selection_over_every_binade(library, with_counts):
    assert_selects_every_binade(flat_selection(library, 1000), with_counts)


def test_selection_all_zeros_and_single_value(library):
    values, offsets = torch.tensor([0.0, 0.0, 0.0, 2.5]), torch.tensor([0, 3, 4])
    got = flat_selection(library, CUDA_SELECTION_BLOCK)(values, offsets, None, 0.5, 0.85)
    expected = reference.topk_mean_and_effective_rank(values, offsets, None, 0.5, 0.85)
    for g, e in zip(got, expected):
        assert torch.equal(g.double(), e.double())


@pytest.mark.parametrize("block", BLOCKS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("transposed", [False, True])
def test_fused_saliency_selection(library, block, dtype, transposed):
    weight, inverse = saliency_case(61, 47, transposed, dtype, ties=True)
    select = fused_selection(library, block)
    for k_frac, alpha in SELECTION_TARGETS:
        got = select(weight, inverse, k_frac, alpha)
        expected = reference.saliency_topk_mean_and_effective_rank(weight, inverse, k_frac, alpha)
        assert_same_selection(got, expected)


def test_compacting_pass_keeps_exactly_the_matching_elements(library):
    """The second pass's candidates are the elements whose top 11 bits pick a target's bucket, as a multiset,
    per segment: one segment whose 9000 values are all candidates of one shared target bucket (many stage
    flushes a warp), one whose two targets lie in different buckets."""
    generator = torch.Generator().manual_seed(3)
    values = torch.cat([1.0 + torch.rand(9000, generator=generator) / 16, torch.rand(3000, generator=generator) * 100])
    offsets = torch.tensor([0, 9000, 12000])
    parts = (slice(0, 9000), slice(9000, 12000))
    high = values.view(torch.int32).long() >> 20  # the first pass's 11 bits (the sign is 0)
    buckets = high[parts[1]].unique()
    prefix = torch.tensor([[high[0], high[0]], [buckets[-1], buckets[-2]]])
    matching = [torch.isin(high[part], prefix[s]) for s, part in enumerate(parts)]
    sizes = torch.stack([m.sum() for m in matching])
    candidate_offsets = torch.cat([torch.zeros(1, dtype=torch.long), sizes.cumsum(0)])
    candidates = (torch.full((int(sizes.sum()),), -1.0), candidate_offsets, torch.zeros(2, dtype=torch.long))
    hist_count, hist_sum = torch.zeros(2, 2, 1024, dtype=torch.long), torch.zeros(2, 2, 1024, dtype=torch.double)
    segment, start = block_table(offsets, 4096)
    emulated.radix_histogram(library)(
        values, None, segment, start, offsets, prefix, 10, 10, hist_count, hist_sum, 4096, candidates
    )
    assert torch.equal(candidates[2], sizes)
    for s, part in enumerate(parts):
        got = candidates[0][int(candidate_offsets[s]) : int(candidate_offsets[s + 1])]
        assert torch.equal(torch.sort(got).values, torch.sort(values[part][matching[s]]).values)
    assert int(hist_count.sum()) == 2 * 9000 + int(sizes[1])  # a shared prefix fills both targets' histograms


def test_cuda_selection_refuses_multiplicities_that_could_overflow_its_exact_sums():
    from sensilora_kernels import cuda

    values, offsets = torch.rand(10), torch.tensor([0, 10])
    counts = torch.full((10,), cuda.MAX_BLOCK_MULTIPLICITY // cuda.CUDA_SELECTION_BLOCK, dtype=torch.long)
    with pytest.raises(ValueError, match="could overflow the exact 64-bit block sums"):
        cuda.topk_mean_and_effective_rank(values, offsets, counts)
