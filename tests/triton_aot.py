"""Compile every Triton kernel ahead of time for a Hopper GPU (sm_90) without one: catches what the
interpreter cannot (types, atomics, tl.dot lowering) and, through cuobjdump when Triton ships it, register
spills (a non-zero stack frame). Run as a script with TRITON_INTERPRET unset; prints one 'OK <case>' line
per kernel variant and exits non-zero on the first failure."""

import re
import subprocess
import sys
import tempfile
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from sensilora_kernels.column_sumsq import _column_sumsq_kernel
from sensilora_kernels.gram import _gram_kernel, launch_config
from sensilora_kernels.selection import BLOCK, CHUNK, _radix_histogram_kernel

TARGET = GPUTarget("cuda", 90, 32)
TOKENS = {"n_tokens": "i32", "seq_len": "i32", "d": "i32", "tokens_per_program": "i32",
          "stride_b": "i64", "stride_t": "i64", "stride_d": "i64", "mask_stride_b": "i64", "mask_stride_t": "i64"}


def cases():
    for dtype in ("fp32", "fp16", "bf16"):
        for has_mask in (False, True):
            signature = {"acc_ptr": "*fp32", "x_ptr": f"*{dtype}", "mask_ptr": "*u8", **TOKENS,
                         "HAS_MASK": "constexpr", "BLOCK_T": "constexpr", "BLOCK_D": "constexpr"}
            yield f"column_sumsq {dtype} mask={has_mask}", _column_sumsq_kernel, signature, {"HAS_MASK": has_mask, "BLOCK_T": 32, "BLOCK_D": 128}, {}
            signature = {"gram_ptr": "*fp32", "x_ptr": f"*{dtype}", "mask_ptr": "*u8", "tile_rows_ptr": "*i32", "tile_cols_ptr": "*i32",
                         **TOKENS, "HAS_MASK": "constexpr", "IEEE": "constexpr", "BLOCK_T": "constexpr", "BLOCK_D": "constexpr"}
            config = launch_config(4096)  # what gram_ launches for LLaMA-sized layers
            blocks = {key: config[key] for key in ("BLOCK_T", "BLOCK_D")}
            options = {key: config[key] for key in ("num_warps", "num_stages")}
            yield f"gram {dtype} mask={has_mask}", _gram_kernel, signature, {"HAS_MASK": has_mask, "IEEE": dtype == "fp32", **blocks}, options
    for has_counts, saliency in ((False, False), (True, False), (False, True)):
        signature = {"values_ptr": "*fp32", "counts_ptr": "*i64", "weight_ptr": "*bf16", "inverse_ptr": "*fp32",
                     "block_segment_ptr": "*i64", "block_start_ptr": "*i64", "offsets_ptr": "*i64", "prefix_ptr": "*i64",
                     "hist_count_ptr": "*i64", "hist_sum_ptr": "*fp64", "shift": "i32", "d_in": "i64", "stride_row": "i64",
                     "stride_col": "i64", "HAS_COUNTS": "constexpr", "SALIENCY": "constexpr", "BLOCK": "constexpr",
                     "CHUNK": "constexpr"}
        yield (f"radix_histogram counts={has_counts} saliency={saliency}", _radix_histogram_kernel, signature,
               {"HAS_COUNTS": has_counts, "SALIENCY": saliency, "BLOCK": BLOCK, "CHUNK": CHUNK}, {})


def resource_usage(cubin: bytes) -> dict[str, int] | None:
    """{'REG': registers per thread, 'STACK': stack bytes, ...} of a cubin, or None without cuobjdump."""
    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if not cuobjdump.is_file():
        return None
    with tempfile.NamedTemporaryFile(suffix=".cubin") as file:
        file.write(cubin)
        file.flush()
        listing = subprocess.run([str(cuobjdump), "-res-usage", file.name], capture_output=True, text=True).stdout
    return {key: int(value) for key, value in re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", listing)} or None


def main() -> int:
    for name, kernel, signature, constexprs, options in cases():
        compiled = triton.compile(ASTSource(kernel, signature, constexprs=constexprs), target=TARGET, options=options)
        if not compiled.asm.get("cubin"):
            print(f"FAIL {name}: no cubin")
            return 1
        usage = resource_usage(compiled.asm["cubin"])
        if usage is not None and (usage.get("STACK", 0) or usage.get("LOCAL", 0)):
            print(f"FAIL {name}: spills registers ({usage})")
            return 1
        detail = f" ({usage['REG']} registers, no spills)" if usage else ""
        print(f"OK {name}{detail}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
