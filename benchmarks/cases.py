"""The benchmark cases, each a function returning result rows; used by run_all.py and the pytest suite."""

from __future__ import annotations

import numpy as np
import torch
from sensilora import allocate, calibrate
from sensilora.calibration import forward_kwargs
from sensilora.ops import OPS, reference

from benchmarks.common import measure, time_it
from benchmarks.roofline import candidate_fraction_of


def naive_hessian_diagonal(x: torch.Tensor) -> torch.Tensor:
    """Diagonal of the Hessian of the layer-wise loss ``(1/N) sum_n ((w - w0) . x_n)^2`` of one
    output row, by ``torch.func`` (reverse-over-reverse, 64 rows at a time): the baseline sensilora replaces."""
    w0 = torch.zeros(x.shape[1], dtype=x.dtype, device=x.device)

    def loss(w):
        return ((x @ (w - w0)) ** 2).mean()

    hessian = torch.func.jacrev(torch.func.grad(loss), chunk_size=64)(w0)
    return hessian.diagonal()


def naive_vs_sensilora(
    device: torch.device, columns=(256, 512, 1024, 2048, 4096), tokens: int = 2048, give_up_s: float = 60.0
):
    rows, naive_allowed = [], True
    for d in columns:
        x = torch.randn(tokens, d, device=device, generator=None)
        acc = torch.zeros(d, device=device)

        def ours():
            acc.zero_()
            torch.ops.sensilora.column_sumsq_(acc, x, None)

        ours_s = time_it(ours, device)
        row = {"case": "naive_hessian", "columns": d, "tokens": tokens, "sensilora_s": ours_s}
        if naive_allowed:
            # one untimed call first (torch.func's first-call setup, allocator, kernel caches), then one timed:
            # the naive baseline is timed warm, as ours is, at twice its cost
            found = {}

            def naive_call():
                found["diagonal"] = naive_hessian_diagonal(x)

            naive_s = time_it(naive_call, device, repeats=1, warmup=1)
            naive = found["diagonal"]
            ours_value = 2.0 / tokens * acc
            row.update(
                naive_s=naive_s,
                speedup=naive_s / ours_s,
                max_rel_error=float(((naive - ours_value).abs() / ours_value.abs().clamp_min(1e-30)).max()),
            )
            naive_allowed = naive_s < give_up_s / 4  # the next size costs about 4x
        else:
            row.update(naive_s=None, speedup=None, max_rel_error=None, note="naive skipped: previous size too slow")
        rows.append(row)
    return rows


def per_op(device: torch.device, columns=(4096, 14336), batch: int = 8, seq: int = 2048, dtype=torch.bfloat16):
    """Every op on every backend that can run on ``device``; GB/s and TFLOP/s beside torch baselines."""
    rows = []
    from sensilora_kernels.registry import available_kernels, runs_on

    kernels = {"torch": {spec.name: spec.reference for spec in OPS}}
    kernels.update({name: ops for name, ops in available_kernels()[0].items() if runs_on(name, device.type)})
    names = list(kernels)
    for d in columns:
        x = torch.randn(batch, seq, d, device=device).to(dtype)
        copy_s = time_it(lambda: x.clone(), device)
        copy_gbs = 2 * x.numel() * x.element_size() / copy_s / 1e9
        rows.append({"case": "copy", "backend": "torch", "columns": d, "seconds": copy_s, "GB/s": copy_gbs})
        flat = x.reshape(-1, d)
        baseline_name, baseline = fp32_product(flat)
        mm_s = time_it(baseline, device)
        mm_tflops = 2 * flat.shape[0] * d * d / mm_s / 1e12
        rows.append({"case": baseline_name, "backend": "torch", "columns": d, "seconds": mm_s, "TFLOP/s": mm_tflops})
        for name in names:
            ops = kernels[name]
            if "column_sumsq_" in ops:
                acc = torch.zeros(d, device=device)
                seconds = time_it(lambda: ops["column_sumsq_"](acc, x, None), device)
                gbs = x.numel() * x.element_size() / seconds / 1e9
                rows.append(
                    {
                        "case": "column_sumsq",
                        "backend": name,
                        "columns": d,
                        "seconds": seconds,
                        "GB/s": gbs,
                        "fraction_of_copy": gbs / copy_gbs,
                    }
                )
            if "gram_" in ops:
                gram = torch.zeros(d, d, device=device)
                seconds = time_it(lambda: ops["gram_"](gram, x, None), device, repeats=1)
                rows.append(
                    {
                        "case": "gram",
                        "backend": name,
                        "columns": d,
                        "seconds": seconds,
                        "TFLOP/s": 2 * flat.shape[0] * d * d / seconds / 1e12,
                        "vs_fp32_mm": mm_s / seconds,
                    }
                )
            if "inverse_diagonal" in ops and d <= 4096:
                a = torch.randn(2 * d, d, device=device)
                hessian = (a.T @ a / (2 * d))[None]
                seconds = time_it(lambda: ops["inverse_diagonal"](hessian, 0.01), device, repeats=1)
                rows.append({"case": "inverse_diagonal", "backend": name, "columns": d, "seconds": seconds})
        values = torch.rand(d * 4096 if device.type == "cuda" else d * 256, device=device)
        offsets = torch.tensor([0, values.numel()], device=device)
        weight = torch.randn(values.numel() // d, d, device=device).to(dtype)
        inverse = torch.rand(d, device=device) + 0.01
        saliencies = reference.saliency(weight, inverse).reshape(-1)
        selections = (  # (case, op, arguments, the values torch.sort would sort)
            ("selection", "topk_mean_and_effective_rank", (values, offsets, None, 0.5, 0.85), values),
            ("obs selection (fused)", "saliency_topk_mean_and_effective_rank", (weight, inverse, 0.5, 0.85),
             saliencies),
        )  # fmt: skip
        for case, op, args, sortable in selections:
            # vs_sort: against torch.sort of the same values alone (what the kernels replace); the whole torch
            # reference (sort, cumulative sums, the saliency itself for obs) is timed beside it
            sort_s = time_it(lambda: torch.sort(sortable, descending=True), device)
            reference_s = time_it(lambda: getattr(reference, op)(*args), device, repeats=1)
            for label, seconds in (("torch.sort", sort_s), ("torch reference", reference_s)):
                rows.append({"case": f"{case}: {label}", "backend": "torch", "columns": d, "values": values.numel(),
                             "seconds": seconds})  # fmt: skip
            fraction = candidate_fraction_of(sortable)  # what the CUDA selection's third pass reads
            for name in names:
                ops = kernels[name]
                if name != "torch" and op in ops:
                    seconds = time_it(lambda: ops[op](*args), device)
                    rows.append(
                        {
                            "case": case,
                            "backend": name,
                            "columns": d,
                            "values": values.numel(),
                            "seconds": seconds,
                            "vs_sort": sort_s / seconds,
                            "vs_reference": reference_s / seconds,
                            "candidate_fraction": fraction,
                        }
                    )
    return rows


def fp32_product(flat: torch.Tensor):
    """(name, callable) of the dense ``X^T X`` that ``gram_`` competes with, written in fp32 like ``gram_``'s
    accumulator: ``torch.mm(..., out_dtype=float32)`` for half inputs where torch has it (CUDA), else fp32
    ``torch.mm`` of inputs upcast once outside the timing."""
    if flat.dtype != torch.float32 and flat.device.type == "cuda":
        return "torch.mm out fp32", lambda: torch.mm(flat.T, flat, out_dtype=torch.float32)
    upcast = flat.float()
    return "torch.mm fp32", lambda: torch.mm(upcast.T, upcast)


def end_to_end(model, batches, device: torch.device, label: str, tokens: int, pairs: int = 3):
    """Bare forward against calibrate (diag, obs), timed in interleaved pairs after a warm-up of each (first
    calls compile and fill caches), so that drift hits both alike; the overhead is the median of the pairs'
    ratios. Then metrics + allocation. Peak memory on CUDA."""
    extra = forward_kwargs(model)  # the bare forward runs exactly as calibrate's does

    def bare():
        with torch.no_grad():
            for batch in batches:
                model(**batch, **extra)

    def seconds_and_peak(fn):
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        seconds = measure(fn, device, repeats=1, warmup=0)["p50"]
        return seconds, (torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None)

    base = {"case": "end_to_end", "model": label, "tokens": tokens}
    bare()
    rows, bare_times = [], []
    for mode in ("diag", "obs"):
        holder = {}

        def calibrated():
            holder["stats"] = calibrate(model, batches, mode=mode, progress=False)

        calibrated()  # warm-up
        ratios, times, memory = [], [], None
        for _ in range(pairs):
            bare_s, bare_memory = seconds_and_peak(bare)
            seconds, memory = seconds_and_peak(calibrated)
            bare_times.append((bare_s, bare_memory))
            times.append(seconds)
            ratios.append(seconds / bare_s - 1)
        seconds = float(np.median(times))
        rows.append({**base, "stage": f"calibrate {mode}", "seconds": seconds, "tokens/s": tokens / seconds,
                     "overhead": float(np.median(ratios)), "overhead_min": min(ratios), "overhead_max": max(ratios),
                     "peak_GiB": memory})  # fmt: skip
        stats = holder["stats"]
        timing = measure(lambda: allocate(stats, avg_rank=8, model=model), device, repeats=1, warmup=0)
        rows.append({**base, "stage": f"metrics+allocation {mode}", "seconds": timing["p50"]})
    bare_s = float(np.median([t for t, _ in bare_times]))
    bare_row = {**base, "stage": "bare forward", "seconds": bare_s, "tokens/s": tokens / bare_s, "overhead": 0.0,
                "peak_GiB": bare_times[0][1]}  # fmt: skip
    return [bare_row, *rows]
