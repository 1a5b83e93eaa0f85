"""The CPU backend's selection (two-level bucketing, sensilora_kernels.cpu) against the sorted reference."""

import pytest
import torch
from sensilora.ops import reference

from sensilora_kernels import cpu
from tests.kernel_cases import (
    SELECTION_CASES,
    SELECTION_TARGETS,
    assert_same_selection,
    assert_selects_every_binade,
    saliency_case,
    selection_case,
)


@pytest.mark.parametrize("lengths,with_counts,ties", SELECTION_CASES)
@pytest.mark.parametrize("k_frac,alpha", SELECTION_TARGETS)
def test_selection_equals_sorted_reference(lengths, with_counts, ties, k_frac, alpha):
    values, offsets, counts = selection_case(lengths, seed=len(lengths), with_counts=with_counts, ties=ties)
    got = cpu.topk_mean_and_effective_rank(values, offsets, counts, k_frac, alpha)
    assert_same_selection(got, reference.topk_mean_and_effective_rank(values, offsets, counts, k_frac, alpha))


def test_all_zero_segment_single_value_and_values_sharing_their_top_bits():
    values, offsets = torch.tensor([0.0, 0.0, 0.0, 2.5]), torch.tensor([0, 3, 4])
    got = cpu.topk_mean_and_effective_rank(values, offsets, None, 0.5, 0.85)
    for g, e in zip(got, reference.topk_mean_and_effective_rank(values, offsets, None, 0.5, 0.85)):
        assert torch.equal(g.double(), e.double())
    # 3000 distinct values in one 16-bit bucket (1.0 .. 1.0 + 3000 ulps): level two alone decides
    close = (torch.tensor(1.0).view(torch.int32) + torch.arange(3000, dtype=torch.int32)).view(torch.float32)
    offsets = torch.tensor([0, 3000])
    for k_frac, alpha in SELECTION_TARGETS:
        got = cpu.topk_mean_and_effective_rank(close, offsets, None, k_frac, alpha)
        assert_same_selection(got, reference.topk_mean_and_effective_rank(close, offsets, None, k_frac, alpha))


@pytest.mark.parametrize("transposed", [False, True])
def test_fused_saliency_selection(transposed):
    weight, inverse = saliency_case(330, 190, transposed)
    got = cpu.saliency_topk_mean_and_effective_rank(weight, inverse, 1 / 3, 0.8)
    assert_same_selection(got, reference.saliency_topk_mean_and_effective_rank(weight, inverse, 1 / 3, 0.8))


@pytest.mark.parametrize("with_counts", [False, True])
def test_selection_over_every_binade(with_counts):
    assert_selects_every_binade(cpu.topk_mean_and_effective_rank, with_counts)
