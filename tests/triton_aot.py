"""Compile every Triton kernel ahead of time for a Hopper GPU (sm_90) without one, specialised as a
LLaMA-sized launch would specialise it (contiguous and strided layouts): catches what the
interpreter cannot (types, atomics, tl.dot lowering) and, through cuobjdump when Triton ships it, register
spills (a non-zero stack frame). Run as a script with TRITON_INTERPRET unset; prints one 'OK <case>' line
per kernel variant and exits non-zero on the first failure."""

import itertools
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import triton
from triton._C.libtriton import native_specialize_impl
from triton.backends.compiler import BaseBackend, GPUTarget
from triton.compiler import ASTSource

from sensilora_kernels.triton_backend.column_sumsq import _column_sumsq_kernel
from sensilora_kernels.triton_backend.gram import _gram_kernel, launch_config
from sensilora_kernels.triton_backend.selection import BLOCK, CHUNK, RADIX_BITS, _radix_histogram_kernel

TARGET = GPUTarget("cuda", 90, 32)
# LLaMA-3.1-8B-sized launches: (8, 2048, 4096) activations, contiguous or with every other column of a
# (8, 2048, 8192) tensor, and a (14336, 4096) weight; the integer arguments as the kernels receive them.
LAYOUTS = {"contiguous": (8 * 2048 * 4096, 4096, 1), "strided columns": (8 * 2048 * 8192, 8192, 2)}
TOKEN_ARGS = {
    "n_tokens": 8 * 2048,
    "seq_len": 2048,
    "d": 4096,
    "tokens_per_program": 2048,
    "mask_stride_b": 2048,
    "mask_stride_t": 1,
}


def specialise(kernel, pointers: dict, values: dict, constexprs: dict):
    """(signature, constants, attributes) as Triton's JIT derives them when launched with these values:
    integers equal to 1 become constants, multiples of 16 carry a divisibility hint, pointers (16-byte
    aligned, as torch allocates them) too."""
    signature, constants, attributes = {}, dict(constexprs), {}
    for index, name in enumerate(kernel.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in pointers:
            signature[name] = f"*{pointers[name]}"
            attributes[(index,)] = [["tt.divisibility", 16]]
        else:
            kind, hint = native_specialize_impl(BaseBackend, values[name], False, True, True)
            signature[name] = kind
            if kind == "constexpr":
                constants[name] = values[name]
            elif hint == "D":
                attributes[(index,)] = [["tt.divisibility", 16]]
    return signature, constants, attributes


def cases():
    for dtype, (layout, strides) in itertools.product(("fp32", "fp16", "bf16"), LAYOUTS.items()):
        values = {**TOKEN_ARGS, **dict(zip(("stride_b", "stride_t", "stride_d"), strides))}
        weighted = {**values, "weight_stride_b": 2048, "weight_stride_t": 1}
        for has_mask, has_weight in ((False, False), (True, False), (True, True)):  # weights: Fisher, padded
            pointers = {"acc_ptr": "fp32", "x_ptr": dtype, "mask_ptr": "u8", "weight_ptr": "fp32"}
            constexprs = {"HAS_MASK": has_mask, "HAS_WEIGHT": has_weight, "BLOCK_T": 32, "BLOCK_D": 128}
            yield (
                f"column_sumsq {dtype} {layout} mask={has_mask} weight={has_weight}",
                _column_sumsq_kernel,
                *specialise(_column_sumsq_kernel, pointers, weighted, constexprs),
                {},
            )
            if has_weight:  # gram_ takes no weights
                continue
            config = launch_config(4096, ieee=dtype == "fp32", unit_column_stride=strides[2] == 1)  # as gram_ launches
            blocks = {key: config[key] for key in ("BLOCK_T", "BLOCK_D")}
            options = {key: config[key] for key in ("num_warps", "num_stages")}
            pointers = {
                "gram_ptr": "fp32",
                "x_ptr": dtype,
                "mask_ptr": "u8",
                "tile_rows_ptr": "i32",
                "tile_cols_ptr": "i32",
            }
            yield (
                f"gram {dtype} {layout} mask={has_mask}",
                _gram_kernel,
                *specialise(_gram_kernel, pointers, values, {"HAS_MASK": has_mask, "IEEE": dtype == "fp32", **blocks}),
                options,
            )
    pointers = {
        name: kind
        for name, kind in zip(
            (
                "values_ptr",
                "counts_ptr",
                "weight_ptr",
                "reciprocal_ptr",
                "block_segment_ptr",
                "block_start_ptr",
                "offsets_ptr",
                "prefix_ptr",
                "hist_count_ptr",
                "hist_sum_ptr",
            ),
            ("fp32", "i64", "bf16", "fp32", "i64", "i64", "i64", "i64", "i64", "fp64"),
        )
    }
    for has_counts, saliency in ((False, False), (True, False), (False, True)):
        values = {
            "shift": 8,
            "d_in": 4096 if saliency else 1,
            "stride_row": 4096 if saliency else 0,
            "stride_col": 1 if saliency else 0,
        }
        yield (
            f"radix_histogram counts={has_counts} saliency={saliency}",
            _radix_histogram_kernel,
            *specialise(
                _radix_histogram_kernel,
                pointers,
                values,
                {"HAS_COUNTS": has_counts, "SALIENCY": saliency, "BITS": RADIX_BITS, "BLOCK": BLOCK, "CHUNK": CHUNK},
            ),
            {},
        )


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
    for name, kernel, signature, constants, attributes, options in cases():
        source = ASTSource(kernel, signature, constexprs=constants, attrs=attributes)
        compiled = triton.compile(source, target=TARGET, options=options)
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
