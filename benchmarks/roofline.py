"""Design bounds for an H100 SXM, from its datasheet and the kernels' sm_90 SASS: the time each op would
take at its bound at the LLaMA-3.1-8B shapes, to read the measured GPU rows against (and, where no GPU was
lent, the evidence there is).

    python -m benchmarks.roofline

Streaming ops: bytes / HBM bandwidth. ``gram_``: flops / dense bf16 tensor-core peak. Selections: per pass,
the larger of bytes / bandwidth and warp instructions / issue rate, the warp instructions per element
counted in the main loop of the compiled kernel (nvcc for csrc/, Triton's AOT path for Triton; both need no
GPU). The count is static: every branch of the loop body once, an upper bound of what an element executes;
it leaves out the serialisation of a warp's distinct buckets in REDUX (at most their number) and memory
latency. The CUDA selection reads the data twice (11 bits, then 10 bits while compacting the candidates) and
the candidates once more (10 bits): its third pass costs the candidate fraction ``f`` of a pass, given
for a model of obs saliencies (Gaussian weights, inverse-Hessian diagonal log-uniform over two decades; the
fraction of values in the two targets' 1/8-binade buckets) and for the worst case, f = 1 (every value in one
bucket). ``torch.sort``'s bound is its radix sort's traffic: 4 passes of 8 bits, each reading and writing
the fp32 key and int64 index (12 B), plus the index initialisation: 104 B a value.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

H100_SXM = {"hbm_bytes_per_s": 3.35e12, "bf16_dense_flops_per_s": 989e12, "warp_issue_per_s": 132 * 4 * 1.98e9}
SORT_BYTES_PER_VALUE = 4 * 2 * 12 + 8
TOKENS, HIDDEN, FFN = 8 * 2048, 4096, 14336  # one calibration batch and the widest weight of LLaMA-3.1-8B
ROOT = Path(__file__).resolve().parents[1]


def _cuobjdump() -> Path | None:
    import triton

    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    return path if path.is_file() else None


def main_loop_instructions(sass: str) -> dict[str, int]:
    """{function name: instructions in its longest loop (a backward branch's span)} of a cuobjdump -sass listing.
    Only branches before the last EXIT count: the out-of-line paths placed after it (divergent warp
    intrinsics' fallbacks) branch back into the loop without being part of its body."""
    counts = {}
    for function in re.split(r"\n\s+Function : ", sass)[1:]:
        lines = [line for line in function.splitlines() if re.match(r"\s+/\*[0-9a-f]{4}\*/", line)]
        address = [int(re.match(r"\s+/\*([0-9a-f]{4})\*/", line).group(1), 16) for line in lines]
        last_exit = max((a for line, a in zip(lines, address) if re.search(r"\bEXIT\b", line)), default=address[-1])
        spans = [
            (int(branch.group(1), 16), here)
            for line, here in zip(lines, address)
            if (branch := re.search(r"BRA (0x[0-9a-f]+)", line)) and int(branch.group(1), 16) < here <= last_exit
        ]
        if spans:
            low, high = max(spans, key=lambda span: span[1] - span[0])
            counts[function.split("\n", 1)[0].strip()] = sum(low <= a <= high for a in address)
    return counts


def _sass(cubin: bytes) -> str:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as file:
        file.write(cubin)
        file.flush()
        return subprocess.run([str(_cuobjdump()), "-sass", file.name], capture_output=True, text=True).stdout


def cuda_selection_instructions() -> dict[str, dict[str, float]] | None:
    """Warp instructions per element of csrc/radix_select.cu's main loops, {"flat"|"fused": {"plain",
    "compacting"}}, or None without nvcc or cuobjdump. A loop handles 4 elements a thread (kUnroll), 32
    threads a warp; the bf16 weight's loop stands for the fused kernel."""
    if shutil.which("nvcc") is None or _cuobjdump() is None:
        return None
    with tempfile.TemporaryDirectory() as directory:
        cubin = Path(directory) / "radix_select.cubin"
        source = ROOT / "csrc" / "radix_select.cu"
        command = ["nvcc", "-std=c++17", "-O3", "-arch=sm_90", "-cubin", f"-I{ROOT / 'csrc'}", str(source), "-o"]
        if subprocess.run([*command, str(cubin)], capture_output=True).returncode != 0:
            return None
        loops = main_loop_instructions(_sass(cubin.read_bytes()))
    found: dict[str, dict[str, float]] = {"flat": {}, "fused": {}}
    for name, count in loops.items():
        # mangled template arguments: <FlatValues<false>, b> or <Saliencies<__nv_bfloat16>, b>
        if "FlatValuesILb0E" in name:
            kind = "flat"
        elif "Saliencies" in name and "bfloat16" in name:
            kind = "fused"
        else:
            continue
        found[kind]["compacting" if "ELb1EE" in name else "plain"] = count / (4 * 32)
    return found


def candidate_fraction_of(values) -> float:
    """The fraction of non-negative fp32 ``values`` in the two targets' first-pass buckets (top 11 bits below
    the sign) at k = ceil(m / 2) and alpha = 0.85: what the CUDA selection's third pass reads."""
    import torch

    values = values.reshape(-1).float().sort(descending=True).values
    at_k = values[(values.numel() + 1) // 2 - 1]
    cumulative = values.double().cumsum(0)
    at_alpha = values[min(int(torch.searchsorted(cumulative, 0.85 * cumulative[-1])), values.numel() - 1)]
    targets = torch.unique(torch.stack([at_k, at_alpha]).view(torch.int32) >> 20)
    return float(torch.isin(values.view(torch.int32) >> 20, targets).double().mean())


def candidate_fraction(samples: int = 1 << 20, seed: int = 0) -> float:
    """``candidate_fraction_of`` model obs saliencies: w ~ N(0, 1), inverse-Hessian diagonal log-uniform over
    [0.1, 10]."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    columns = 1024
    weight = torch.randn(samples // columns, columns, generator=generator)
    inverse = 10 ** (torch.rand(columns, generator=generator) * 2 - 1)
    return candidate_fraction_of(weight * weight * (1 / inverse))


def triton_selection_instructions() -> dict[str, float] | None:
    """The same for the Triton histogram (loop over CHUNK elements, num_warps warps), or None without cuobjdump."""
    if _cuobjdump() is None:
        return None
    import triton
    from triton.compiler import ASTSource

    from sensilora_kernels.triton_backend.selection import CHUNK
    from tests import triton_aot

    found = {}
    for name, kernel, signature, constants, attributes, options in triton_aot.cases():
        if not name.startswith("radix_histogram") or "counts=True" in name:
            continue
        source = ASTSource(kernel, signature, constexprs=constants, attrs=attributes)
        cubin = triton.compile(source, target=triton_aot.TARGET, options=options).asm["cubin"]
        (count,) = main_loop_instructions(_sass(cubin)).values()
        found["fused" if "saliency=True" in name else "flat"] = count * options.get("num_warps", 4) / CHUNK
    return found


def _counted(backend: str, count):
    """``count()``, or None with the reason printed: a bound is evidence, never a reason for a benchmark run
    to stop."""
    try:
        return count()
    except Exception as error:  # noqa: BLE001  (any compiler failure: report it and go on)
        print(f"roofline: no SASS count for the {backend} selection ({type(error).__name__}: {error})")
        return None


def bounds() -> list[dict]:
    """One row per op and backend: the H100 SXM bound in seconds at the LLaMA-3.1-8B shapes, and what binds."""
    from sensilora_kernels.triton_backend.selection import RADIX_BITS as TRITON_BITS

    bandwidth, issue = H100_SXM["hbm_bytes_per_s"], H100_SXM["warp_issue_per_s"]
    rows = []
    for d in (HIDDEN, FFN):
        activations = TOKENS * d * 2  # bf16
        rows.append({"op": "column_sumsq_", "columns": d, "bound_s": activations / bandwidth, "bound": "HBM"})
        flops = TOKENS * d * d  # the lower triangle (and diagonal tiles) of 2 T d^2
        rows.append({"op": "gram_", "columns": d, "bound_s": flops / H100_SXM["bf16_dense_flops_per_s"],
                     "bound": "tensor cores (lower triangle)"})  # fmt: skip
    values = FFN * HIDDEN
    rows.append({"op": "torch.sort", "values": values, "bound_s": values * SORT_BYTES_PER_VALUE / bandwidth,
                 "bound": "HBM (radix sort traffic)"})  # fmt: skip
    issue_s = values / issue  # one warp instruction per element
    fraction = candidate_fraction()
    cuda_counts = _counted("cuda", cuda_selection_instructions)
    triton_counts = _counted("triton", triton_selection_instructions)
    for kind, loops in (cuda_counts or {}).items():
        if set(loops) != {"plain", "compacting"}:
            continue
        element_bytes = 4 if kind == "flat" else 2  # fp32 values, or the bf16 weight (+ the cached reciprocal)
        flat = (cuda_counts.get("flat") or {}).get("plain", loops["plain"])  # the third pass reads fp32 candidates
        for label, f in (("model obs saliencies", fraction), ("worst case", 1.0)):
            passes_s = [  # (memory, issue) of each pass: full, full + candidate writes, candidates
                (values * element_bytes / bandwidth, loops["plain"] * issue_s),
                (values * (element_bytes + 4 * f) / bandwidth, loops["compacting"] * issue_s),
                (values * 4 * f / bandwidth, flat * f * issue_s),
            ]
            memory_s, compute_s = (sum(part) for part in zip(*passes_s))
            rows.append({
                "op": f"selection ({kind})", "backend": "cuda", "values": values, "passes": "11+10 bits, 10 on f",
                "candidate_fraction": f"{f:.3f} ({label})",
                "warp_instructions_per_element_pass": f"{loops['plain']:.2f} / {loops['compacting']:.2f} / {flat:.2f}",
                "bound_s": sum(max(memory, compute) for memory, compute in passes_s),
                "bound": "instruction issue (static count)" if compute_s > memory_s else "HBM",
            })  # fmt: skip
    for kind, per_element in (triton_counts or {}).items():
        passes = 32 // TRITON_BITS
        element_bytes = 4 if kind == "flat" else 2
        memory_s = passes * values * element_bytes / bandwidth
        rows.append({
            "op": f"selection ({kind})", "backend": "triton", "values": values, "passes": passes,
            "warp_instructions_per_element_pass": round(per_element, 2),
            "bound_s": max(memory_s, passes * per_element * issue_s),
            "bound": "instruction issue (static count)" if passes * per_element * issue_s > memory_s else "HBM",
        })  # fmt: skip
    sort_s = next(r["bound_s"] for r in rows if r["op"] == "torch.sort")
    for row in rows:
        if row["op"].startswith("selection"):
            row["sort_bound_over_this"] = sort_s / row["bound_s"]
    return rows


def main() -> int:
    from benchmarks.common import markdown_table

    rows = bounds()
    columns = list(dict.fromkeys(key for row in rows for key in row))
    print("H100 SXM design bounds (datasheet: 3.35 TB/s, 989 TFLOP/s bf16 dense, 132 SMs x 4 schedulers x 1.98 GHz)")
    print(markdown_table(rows, columns))
    return 0


if __name__ == "__main__":
    sys.exit(main())
