"""Top-k means and effective ranks without sorting: exact radix selection on the fp32 bit patterns.

Non-negative fp32 values order like their int32 bit patterns. A few passes over the data build, per
segment and per target, histograms of counts and fp64 sums over the next bits of the elements that still
match the prefix chosen so far; a cumsum over the buckets picks the bucket that holds the target. The
widths are the backend's: 11, 10, 10 bits (3 passes over the 31 bits below the sign, which is 0) where a
histogram costs one shared-memory atomic an element (CUDA), 4 bits (8 passes) where it costs a one-hot
tile of the buckets (Triton), which 16 buckets keep small. Target 0 is the k-th largest value
(k = ceil(k_frac*m), METHOD.md eq. 9); target 1 is the value at which the descending prefix sum reaches
alpha * total (eq. 10). After the last pass the threshold ``t`` is exact, and
``sum(v > t) + (k - count(v > t)) * t`` is the top-k sum, ties included.

A backend that can compact (CUDA) writes, during the second pass, the elements that still match a target
to a candidate buffer (sized from the first pass's counts: one host synchronisation) and makes the later
passes over those alone: after a 1/8-binade first bucket, a few percent of the data.

This driver is torch only; the histogram pass is a backend's (Triton in ``selection``, CUDA in ``csrc``),
passed in as a launcher. Both sum a block of elements locally and flush one atomic per non-empty bucket.
"""

from __future__ import annotations

from typing import Callable

import torch
from sensilora.ops.reference import check_selection_args, saliency_reciprocal, topk_count

# histogram_pass(prefix (S, 2) int64, shift, bits, hist_count (S, 2, B) int64, hist_sum (S, 2, B) fp64),
# B = 2^bits: adds the counts and fp64 sums of the elements whose bits above ``shift + bits`` equal ``prefix``.
HistogramPass = Callable[[torch.Tensor, int, int, torch.Tensor, torch.Tensor], None]
# narrow(prefix, shift, bits, hist_count, hist_sum, sizes (S,) int64): the same pass, which also keeps the
# elements matching a target (at most sizes[s] in segment s); returns the histogram pass over those alone.
Narrow = Callable[[torch.Tensor, int, int, torch.Tensor, torch.Tensor, torch.Tensor], HistogramPass]


def block_table(offsets: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(segment, start) of every block of ``block`` elements, no block crossing a segment boundary."""
    lengths = offsets[1:] - offsets[:-1]
    blocks = (lengths + block - 1) // block
    segment = torch.repeat_interleave(torch.arange(lengths.numel(), device=offsets.device), blocks)
    first_block = torch.cumsum(blocks, 0) - blocks
    start = (
        offsets[:-1][segment] + (torch.arange(segment.numel(), device=offsets.device) - first_block[segment]) * block
    )
    return segment, start


def _pick(cumulative: torch.Tensor, needed: torch.Tensor, usable: torch.Tensor) -> torch.Tensor:
    """Index (descending bucket order) of the first bucket whose cumulative value reaches ``needed``,
    never past the last usable bucket (guards fp64 rounding in the sums)."""
    position = (cumulative < needed[..., None]).sum(-1)
    last = usable.shape[-1] - 1 - torch.flip(usable, [-1]).int().argmax(-1)
    return torch.minimum(position, last)


def radix_select(
    histogram_pass: HistogramPass,
    segments: int,
    device: torch.device,
    k_frac: float,
    alpha: float,
    widths: tuple[int, ...],
    narrow: Narrow | None = None,
):
    """Drive one histogram pass per width (widths summing to 31 or 32, the top first); with ``narrow``, the
    second pass also compacts the candidates and the later passes read only those. Returns (total fp64,
    topk mean fp64, effective rank int64), each (S,)."""
    if sum(widths) not in (31, 32) or min(widths) < 1:
        raise ValueError(f"radix_select: widths {widths} must be positive and cover 31 or 32 bits")
    prefix = torch.zeros(segments, 2, dtype=torch.int64, device=device)
    above_count = torch.zeros(segments, 2, dtype=torch.int64, device=device)
    above_sum = torch.zeros(segments, 2, dtype=torch.float64, device=device)
    shift = sum(widths)
    final_counts = torch.zeros_like(prefix)  # elements in each target's bucket, from the last pass
    for number, bits in enumerate(widths):
        shift -= bits
        buckets = 1 << bits
        hist_count = torch.zeros(segments, 2, buckets, dtype=torch.int64, device=device)
        hist_sum = torch.zeros(segments, 2, buckets, dtype=torch.float64, device=device)
        if number == 1 and narrow is not None:
            # the elements of each target's bucket (counts are element counts: no multiplicities here)
            sizes = final_counts[:, 0] + torch.where(prefix[:, 0] != prefix[:, 1], final_counts[:, 1], 0)
            histogram_pass = narrow(prefix, shift, bits, hist_count, hist_sum, sizes)
        else:
            histogram_pass(prefix, shift, bits, hist_count, hist_sum)
        counts = torch.flip(hist_count, [-1])  # descending value order
        sums = torch.flip(hist_sum, [-1])
        cum_counts, cum_sums = counts.cumsum(-1), sums.cumsum(-1)
        if number == 0:
            total = cum_sums[:, 0, -1].clone()
            k = topk_count(cum_counts[:, 0, -1], k_frac)
            goal_sum = alpha * total
        pick_count = _pick(cum_counts[:, 0].double(), (k - above_count[:, 0]).double(), counts[:, 0] > 0)
        pick_sum = _pick(cum_sums[:, 1], goal_sum - above_sum[:, 1], sums[:, 1] > 0)
        picks = torch.stack([pick_count, pick_sum], 1)
        before = (picks - 1).clamp_min(0)[..., None]  # the last bucket wholly above the target
        has_before = picks > 0
        above_count += torch.where(has_before, cum_counts.gather(-1, before)[..., 0], 0)
        above_sum += torch.where(has_before, cum_sums.gather(-1, before)[..., 0], 0.0)
        prefix = prefix * buckets + (buckets - 1 - picks)
        final_counts = counts.gather(-1, picks[..., None])[..., 0]  # elements in each target's bucket
    threshold = prefix.to(torch.int32).view(torch.float32).double()  # exact values at the two targets
    topk_mean = (above_sum[:, 0] + (k - above_count[:, 0]).double() * threshold[:, 0]) / k.double()
    safe = torch.where(threshold[:, 1] > 0, threshold[:, 1], 1.0)
    needed = torch.ceil((goal_sum - above_sum[:, 1]) / safe).long()
    needed = torch.minimum(needed.clamp_min(1), final_counts[:, 1])
    effective = torch.where(total > 0, above_count[:, 1] + needed, 0)
    return total, topk_mean, effective


def _candidate_pass(histogram: Callable, block: int, candidates: torch.Tensor, offsets: torch.Tensor) -> HistogramPass:
    """The flat histogram pass over compacted candidates (``offsets``: their segments' boundaries)."""
    segment, start = block_table(offsets, block)

    def histogram_pass(prefix, shift, bits, hist_count, hist_sum):
        histogram(candidates, None, segment, start, offsets, prefix, shift, bits, hist_count, hist_sum, block)

    return histogram_pass


def _make_narrow(run_pass: Callable, flat_histogram: Callable, block: int, device: torch.device) -> Narrow:
    """A ``Narrow`` over ``run_pass(prefix, shift, bits, hist_count, hist_sum, out)``, out = (candidate
    values fp32, candidate offsets (S+1,) int64, cursor (S,) int64 zeros), which writes the matching
    elements of segment s to values[offsets[s] + n], n counted in cursor[s]."""

    def narrow(prefix, shift, bits, hist_count, hist_sum, sizes):
        offsets = torch.cat([sizes.new_zeros(1), torch.cumsum(sizes, 0)])
        # the one host synchronisation of a selection: the candidate buffer's size
        candidates = torch.empty(int(offsets[-1]), dtype=torch.float32, device=device)
        cursor = torch.zeros_like(sizes)
        run_pass(prefix, shift, bits, hist_count, hist_sum, (candidates, offsets, cursor))
        return _candidate_pass(flat_histogram, block, candidates, offsets)

    return narrow


def make_selection(histogram: Callable, block: int, widths: tuple[int, ...], compacts: bool = False):
    """The selection op over a backend's histogram launcher ``histogram(values, counts|None, block_segment,
    block_start, offsets, prefix, shift, bits, hist_count, hist_sum, block[, candidates])``, one pass a width;
    ``compacts``: the launcher takes ``candidates`` (see ``_make_narrow``) and values without
    multiplicities are compacted after the first pass."""

    def topk_mean_and_effective_rank(values, offsets, counts=None, k_frac=0.5, alpha=0.85):
        """Same contract as ``sensilora.ops.reference.topk_mean_and_effective_rank``."""
        check_selection_args(values, offsets, counts, k_frac, alpha)
        values = values.float().contiguous()
        offsets = offsets.long().contiguous()
        counts = counts.long().contiguous() if counts is not None else None
        segment, start = block_table(offsets, block)

        def run_pass(prefix, shift, bits, hist_count, hist_sum, *out):
            histogram(values, counts, segment, start, offsets, prefix, shift, bits, hist_count, hist_sum, block, *out)

        narrow = _make_narrow(run_pass, histogram, block, values.device) if compacts and counts is None else None
        return radix_select(run_pass, offsets.numel() - 1, values.device, k_frac, alpha, widths, narrow)

    return topk_mean_and_effective_rank


def make_saliency_selection(
    histogram: Callable, block: int, widths: tuple[int, ...], flat_histogram: Callable | None = None
):
    """The fused obs op over a backend's launcher ``histogram(weight, reciprocal fp32, block_segment,
    block_start, offsets, prefix, shift, bits, hist_count, hist_sum, block[, candidates])`` that computes the
    saliencies ``(w_ij * w_ij) * reciprocal_j`` on the fly: they are never stored. With ``flat_histogram``
    (the backend's flat launcher) the second pass compacts the candidates and the later passes read those."""

    def saliency_topk_mean_and_effective_rank(weight, inverse_diag, k_frac=0.5, alpha=0.85):
        """Same contract as ``sensilora.ops.reference.saliency_topk_mean_and_effective_rank``."""
        d_out, d_in = weight.shape
        offsets = torch.tensor([0, d_out * d_in], dtype=torch.int64, device=weight.device)
        check_selection_args(offsets, offsets, None, k_frac, alpha)
        reciprocal = saliency_reciprocal(inverse_diag)
        segment, start = block_table(offsets, block)

        def run_pass(prefix, shift, bits, hist_count, hist_sum, *out):
            histogram(
                weight, reciprocal, segment, start, offsets, prefix, shift, bits, hist_count, hist_sum, block, *out
            )

        narrow = _make_narrow(run_pass, flat_histogram, block, weight.device) if flat_histogram else None
        return radix_select(run_pass, 1, weight.device, k_frac, alpha, widths, narrow)

    return saliency_topk_mean_and_effective_rank
