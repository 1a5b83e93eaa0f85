"""Design bounds for an H100 SXM, from its datasheet and the kernels' sm_90 SASS: the time each op would
take at its bound at the LLaMA-3.1-8B shapes, to read the measured GPU rows against (and, where no GPU was
lent, the evidence there is).

    python -m benchmarks.roofline

Streaming ops: bytes / HBM bandwidth. ``gram_``: flops / dense bf16 tensor-core peak. Selections: the
larger of passes x bytes / bandwidth and passes x warp instructions / issue rate, the warp instructions
per element counted in the main loop of the compiled kernel (nvcc for csrc/, Triton's AOT path for
Triton; both need no GPU). The count is static: every branch of the loop body once, an upper bound of
what an element executes; it leaves out the serialisation of a warp's distinct buckets in REDUX (at most
their number) and memory latency. ``torch.sort``'s bound is its radix sort's traffic: 4 passes of 8 bits,
each reading and writing the fp32 key and int64 index (12 B), plus the index initialisation: 104 B a value.
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


def cuda_selection_instructions() -> dict[str, float] | None:
    """Warp instructions per element and pass of csrc/radix_select.cu's main loop (flat and fused), or None
    without nvcc or cuobjdump. The loop handles 4 elements a thread (kUnroll), 32 threads a warp."""
    if shutil.which("nvcc") is None or _cuobjdump() is None:
        return None
    with tempfile.TemporaryDirectory() as directory:
        cubin = Path(directory) / "radix_select.cubin"
        source = ROOT / "csrc" / "radix_select.cu"
        command = ["nvcc", "-std=c++17", "-O3", "-arch=sm_90", "-cubin", f"-I{ROOT / 'csrc'}", str(source), "-o"]
        if subprocess.run([*command, str(cubin)], capture_output=True).returncode != 0:
            return None
        loops = main_loop_instructions(_sass(cubin.read_bytes()))
    per_element = {"flat": [], "fused": []}
    for name, count in loops.items():
        per_element["fused" if "Saliencies" in name else "flat"].append(count / (4 * 32))
    return {kind: max(values) for kind, values in per_element.items() if values}


def triton_selection_instructions() -> dict[str, float] | None:
    """The same for the Triton histogram (loop over CHUNK elements, num_warps warps), or None without cuobjdump."""
    if _cuobjdump() is None:
        return None
    import triton
    from triton.compiler import ASTSource

    from sensilora_kernels.selection import CHUNK
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


def bounds() -> list[dict]:
    """One row per op and backend: the H100 SXM bound in seconds at the LLaMA-3.1-8B shapes, and what binds."""
    from sensilora_kernels.radix_select import RADIX_BITS
    from sensilora_kernels.selection import RADIX_BITS as TRITON_BITS

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
    for backend, count, bits in (
        ("cuda", cuda_selection_instructions, RADIX_BITS),
        ("triton", triton_selection_instructions, TRITON_BITS),
    ):
        try:  # a bound is evidence, never a reason for a benchmark run to stop
            counted = count()
        except Exception as error:  # noqa: BLE001  (any compiler failure: report it and go on)
            print(f"roofline: no SASS count for the {backend} selection ({type(error).__name__}: {error})")
            counted = None
        for kind, per_element in (counted or {}).items():
            passes = 32 // bits
            element_bytes = 4 if kind == "flat" else 2  # fp32 values, or the bf16 weight (+ the cached inverse)
            memory_s = passes * values * element_bytes / bandwidth
            issue_s = passes * values * per_element / issue
            rows.append({
                "op": f"selection ({kind})", "backend": backend, "values": values, "passes": passes,
                "warp_instructions_per_element_pass": round(per_element, 2), "bound_s": max(memory_s, issue_s),
                "bound": "instruction issue (static count)" if issue_s > memory_s else "HBM",
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
