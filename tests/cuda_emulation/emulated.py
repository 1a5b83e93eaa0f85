"""csrc/'s CUDA kernels built for the CPU (cuda_host_shim.h) and called through ctypes exactly as
csrc/bindings.cpp calls them, so that the tests can hold them to the torch reference without a GPU."""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
from pathlib import Path

import torch

from sensilora_kernels.views import optional_strides, row_weight_view, token_view

ROOT = Path(__file__).resolve().parents[2]
SHIM = Path(__file__).with_name("cuda_host_shim.h")
SOURCES = [ROOT / "csrc" / "column_sumsq.cu", ROOT / "csrc" / "radix_select.cu"]
DTYPE_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}  # csrc/sensilora_kernels.h


def cuda_include() -> Path | None:
    """The CUDA toolkit's include directory (for cuda_runtime.h, cuda_fp16.h, cuda_bf16.h), if any."""
    candidates = [
        os.environ.get("CUDA_HOME", ""),
        "/usr/local/cuda",
        *sorted(map(str, Path("/usr/local").glob("cuda-*"))),
    ]
    for candidate in candidates:
        if candidate and (Path(candidate) / "include" / "cuda_runtime.h").is_file():
            return Path(candidate) / "include"
    return None


def build(directory: Path) -> ctypes.CDLL:
    """Compile the kernels with g++ into ``directory``/libsensilora_emulated.so and load it.
    Raises RuntimeError saying what is missing (g++ or the CUDA headers) or what g++ printed."""
    include = cuda_include()
    if shutil.which("g++") is None or include is None:
        raise RuntimeError("needs g++ and the CUDA toolkit headers (set CUDA_HOME)")
    library = Path(directory) / "libsensilora_emulated.so"
    command = [
        "g++",
        "-std=c++20",
        "-O1",
        "-shared",
        "-fPIC",
        "-pthread",
        "-Wall",
        "-Werror",
        "-Wno-unknown-pragmas",  # CUDA's #pragma unroll means nothing to g++
        "-x",
        "c++",
        "-include",
        str(SHIM),
        f"-I{include}",
        f"-I{ROOT / 'csrc'}",
        *map(str, SOURCES),
        "-o",
        str(library),
    ]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"g++ failed on csrc/ with the host shim:\n{result.stderr}")
    lib = ctypes.CDLL(str(library))
    p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    lib.sensilora_column_sumsq.argtypes = [p, p, i32, p, p, i64, i64, i64, i64, i64, i64, i64, i64, i64, i64, i32, p]
    table = [p, p, p, p, i32, i32, i64, i32, p, p, p, p, p, p]  # block table .. candidates, stream
    lib.sensilora_radix_histogram.argtypes = [p, p, *table]
    lib.sensilora_saliency_histogram.argtypes = [p, i32, p, i64, i64, i64, *table]
    for launcher in (lib.sensilora_column_sumsq, lib.sensilora_radix_histogram, lib.sensilora_saliency_histogram):
        launcher.restype = i32
    return lib


def column_sumsq_(
    lib: ctypes.CDLL, acc: torch.Tensor, x: torch.Tensor, mask: torch.Tensor | None, splits: int, row_weight=None
) -> None:
    """``acc += sum over real tokens of w x^2`` through csrc/column_sumsq.cu, ``splits`` blocks along the tokens."""
    x3, mask3 = token_view(x, mask)
    weight3 = row_weight_view(x3, row_weight)
    status = lib.sensilora_column_sumsq(
        acc.data_ptr(),
        x3.data_ptr(),
        DTYPE_CODE[x3.dtype],
        *(None if t is None else t.data_ptr() for t in (mask3, weight3)),
        *x3.shape,
        *x3.stride(),
        *optional_strides(mask3),
        *optional_strides(weight3),
        splits,
        None,
    )
    assert status == 0, f"sensilora_column_sumsq returned {status}"


def _pointers(candidates) -> list:
    """The compaction's (values, offsets, cursor) pointers, or three NULLs."""
    return [t.data_ptr() for t in candidates] if candidates is not None else [None, None, None]


def radix_histogram(lib: ctypes.CDLL):
    """A flat histogram launcher for ``sensilora_kernels.radix_select.make_selection``: csrc/radix_select.cu."""

    def histogram(
        values, counts, segment, start, offsets, prefix, shift, bits, hist_count, hist_sum, block, candidates=None
    ) -> None:
        counts_ptr = counts.data_ptr() if counts is not None else None
        status = lib.sensilora_radix_histogram(
            values.data_ptr(),
            counts_ptr,
            segment.data_ptr(),
            start.data_ptr(),
            offsets.data_ptr(),
            prefix.data_ptr(),
            shift,
            bits,
            segment.numel(),
            block,
            hist_count.data_ptr(),
            hist_sum.data_ptr(),
            *_pointers(candidates),
            None,
        )
        assert status == 0, f"sensilora_radix_histogram returned {status}"

    return histogram


def saliency_histogram(lib: ctypes.CDLL):
    """A fused obs launcher for ``sensilora_kernels.radix_select.make_saliency_selection``: csrc/radix_select.cu."""

    def histogram(
        weight, reciprocal, segment, start, offsets, prefix, shift, bits, hist_count, hist_sum, block, candidates=None
    ) -> None:
        status = lib.sensilora_saliency_histogram(
            weight.data_ptr(),
            DTYPE_CODE[weight.dtype],
            reciprocal.data_ptr(),
            weight.shape[1],
            *weight.stride(),
            segment.data_ptr(),
            start.data_ptr(),
            offsets.data_ptr(),
            prefix.data_ptr(),
            shift,
            bits,
            segment.numel(),
            block,
            hist_count.data_ptr(),
            hist_sum.data_ptr(),
            *_pointers(candidates),
            None,
        )
        assert status == 0, f"sensilora_saliency_histogram returned {status}"

    return histogram
