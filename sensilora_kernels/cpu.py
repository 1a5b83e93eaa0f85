"""The CPU backend: top-k means and effective ranks without sorting everything (torch only).

Non-negative fp32 values order like their int32 bit patterns. Level one, one pass over the data: per
segment, ``bincount`` the counts and fp64 sums of the values by their top 16 bits (32768 buckets); a
cumulative sum in descending bucket order finds the bucket holding each target (target 0: the k-th largest
value, ``k = ceil(k_frac*m)``, METHOD.md eq. 9; target 1: where the descending prefix sum reaches
``alpha * total``, eq. 10) and everything above it. Level two: only the values of those buckets (values
sharing their top 16 bits: few) are sorted to finish exactly, as the sorted reference does. The reference's
full sort of 1.3e8 obs saliencies (SmolLM2-135M) becomes about two passes over them.
"""

from __future__ import annotations

import math

import torch
from sensilora.ops.reference import check_selection_args, saliency, topk_count

HIGH_SHIFT = 16
HIGH_BUCKETS = 1 << 15  # bit 31 (the sign) is 0 for non-negative values


def _first_reaching(cumulative: torch.Tensor, goal: torch.Tensor, usable: torch.Tensor) -> torch.Tensor:
    """Per row, the first position whose cumulative value reaches ``goal``, never past the last usable one
    (guards fp64 rounding at the end of a segment)."""
    position = (cumulative < goal[:, None]).sum(-1)
    last = usable.shape[-1] - 1 - torch.flip(usable, [-1]).int().argmax(-1)
    return torch.minimum(position, last)


def _candidates(values, counts, high, bucket: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The values (descending, fp64) and multiplicities of one segment's bucket."""
    chosen = high == bucket
    picked = values[chosen].double()
    multiplicity = counts[chosen] if counts is not None else torch.ones_like(picked, dtype=torch.long)
    order = torch.argsort(picked, descending=True, stable=True)
    return picked[order], multiplicity[order]


def topk_mean_and_effective_rank(values, offsets, counts=None, k_frac=0.5, alpha=0.85):
    """Same contract as ``sensilora.ops.reference.topk_mean_and_effective_rank`` (CPU tensors)."""
    check_selection_args(values, offsets, counts, k_frac, alpha)
    values = values.float().contiguous()
    counts = counts.long().contiguous() if counts is not None else None
    segments = offsets.numel() - 1
    high = values.view(torch.int32) >> HIGH_SHIFT
    index = high  # one segment (every obs matrix): the buckets are the top bits themselves
    if segments > 1:  # int32 bucket ids while segments * 2^15 stays below 2^31, else int64
        dtype = torch.int32 if segments < 1 << 16 else torch.int64
        segment = torch.repeat_interleave(torch.arange(segments, dtype=dtype), offsets.diff().long())
        index = segment * HIGH_BUCKETS + high.to(dtype)
    weighted = values.double() * counts if counts is not None else values.double()
    size = segments * HIGH_BUCKETS
    bucket_counts = torch.bincount(index, weights=None if counts is None else counts.double(), minlength=size)
    bucket_sums = torch.bincount(index, weights=weighted, minlength=size)
    # descending value order: bucket HIGH_BUCKETS - 1 first
    bucket_counts = torch.flip(bucket_counts.double().view(segments, HIGH_BUCKETS), [-1])
    bucket_sums = torch.flip(bucket_sums.view(segments, HIGH_BUCKETS), [-1])
    cum_counts, cum_sums = bucket_counts.cumsum(-1), bucket_sums.cumsum(-1)
    total = cum_sums[:, -1].clone()
    k = topk_count(cum_counts[:, -1].long(), k_frac)
    goal = alpha * total
    at_k = _first_reaching(cum_counts, k.double(), bucket_counts > 0)
    at_goal = _first_reaching(cum_sums, goal, bucket_sums > 0)
    means, ranks = torch.empty(segments, dtype=torch.float64), torch.zeros(segments, dtype=torch.long)
    bounds = offsets.tolist()
    for s in range(segments):
        part = slice(bounds[s], bounds[s + 1])
        part_counts = counts[part] if counts is not None else None
        found: dict[int, tuple] = {}  # both targets often fall in one bucket: its values are sorted once

        def bucket(position: int) -> tuple[int, float, torch.Tensor, torch.Tensor]:
            """(count and sum above the bucket at descending ``position``, its values desc, multiplicities)."""
            if position not in found:
                above = (int(cum_counts[s, position - 1]), float(cum_sums[s, position - 1])) if position else (0, 0.0)
                picked = _candidates(values[part], part_counts, high[part], HIGH_BUCKETS - 1 - position)
                found[position] = (*above, *picked)
            return found[position]

        above_count, above_sum, picked, multiplicity = bucket(int(at_k[s]))
        wanted = int(k[s]) - above_count  # how many of the k largest lie in this bucket
        inside = torch.cumsum(multiplicity, 0)
        group = int(torch.searchsorted(inside, wanted))
        before_count = int(inside[group - 1]) if group else 0
        before_sum = float(torch.sum(picked[:group] * multiplicity[:group])) if group else 0.0
        means[s] = (above_sum + before_sum + (wanted - before_count) * float(picked[group])) / int(k[s])
        if float(total[s]) <= 0:
            continue  # an all-zero segment: effective rank 0
        above_count, above_sum, picked, multiplicity = bucket(int(at_goal[s]))
        inside_sums = torch.cumsum(picked * multiplicity, 0)
        last_positive = int((picked > 0).sum()) - 1
        group = min(int(torch.searchsorted(inside_sums, float(goal[s]) - above_sum)), last_positive)
        before_count = int(multiplicity[:group].sum()) if group else 0
        before_sum = float(inside_sums[group - 1]) if group else 0.0
        needed = math.ceil((float(goal[s]) - above_sum - before_sum) / float(picked[group]))
        ranks[s] = above_count + before_count + min(max(needed, 1), int(multiplicity[group]))
    return total, means, ranks


def saliency_topk_mean_and_effective_rank(weight, inverse_diag, k_frac=0.5, alpha=0.85):
    """Same contract as ``sensilora.ops.reference.saliency_topk_mean_and_effective_rank`` (CPU tensors)."""
    values = saliency(weight, inverse_diag).reshape(-1)
    offsets = torch.tensor([0, values.numel()], dtype=torch.int64)
    return topk_mean_and_effective_rank(values, offsets, None, k_frac, alpha)


KERNELS = {
    "topk_mean_and_effective_rank": topk_mean_and_effective_rank,
    "saliency_topk_mean_and_effective_rank": saliency_topk_mean_and_effective_rank,
}
