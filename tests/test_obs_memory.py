"""obs mode's finish (scale, damp, invert) in bounded memory: a live-tensor trace of the CPU allocator
(torch.profiler, op-granular) shows its extra memory set by the chunk size, not by the number of grams."""

import torch
from sensilora.calibration.observers import HessianInverse
from torch.profiler import ProfilerActivity, profile


def finish_peak_bytes(grams: int, d: int, chunk_bytes: int) -> int:
    """Peak of the bytes allocated minus freed while the obs observer finishes ``grams`` d x d sums."""
    shapes = {f"m{i}": (d, d) for i in range(grams)}
    observer = HessianInverse(shapes, inverse_chunk_bytes=chunk_bytes)
    generator = torch.Generator().manual_seed(0)
    for name in shapes:
        with observer.batch(None, 0):
            observer.observe(name, torch.randn(2, 3 * d, d, generator=generator))
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as trace:
        observer.finish(0.01)
    changes = sorted(  # frees outside ops are "[memory]" events; an op's own allocations its self usage
        (event.time_range.start, event.cpu_memory_usage if event.name == "[memory]" else event.self_cpu_memory_usage)
        for event in trace.events()
    )
    live = peak = 0
    for _, change in changes:
        live += change
        peak = max(peak, live)
    return peak


def test_finish_extra_memory_follows_the_chunk_not_the_model():
    d = 96
    gram = d * d * 4
    chunk = 2 * gram  # two grams inverted at a time
    small, large = (finish_peak_bytes(n, d, chunk) for n in (4, 16))
    assert large <= 1.25 * small + gram  # four times the grams, about the same extra memory
    assert large <= 4 * chunk  # the stacked chunk, its factor and inverse: a few chunks (METHOD.md, obs mode)
    unchunked = finish_peak_bytes(16, d, 2**40)
    assert unchunked > 2 * large  # without chunking the extra grows with the number of grams
