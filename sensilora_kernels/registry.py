"""Which kernel serves each ``sensilora::*`` op, chosen once, and its registration in torch's dispatcher.

``register()`` (the ``sensilora.backends`` entry point; also run by ``import sensilora_kernels``) loads
the backends that can load here, picks one per op from ``PREFERENCE`` (or the one that
``SENSILORA_BACKEND`` forces) and registers it for the CUDA dispatch key, so CUDA tensors reach it with
no Python routing per call; for the CPU key ``CPU_PREFERENCE`` does the same (the torch-only ``cpu``
backend's selections), every other op on CPU tensors keeps the torch reference. Under
``TRITON_INTERPRET=1`` a forced ``triton`` is registered for the CPU key too (how the tests run Triton
without a GPU). The CUDA backend loads without Triton, and Triton without the CUDA extension.
"""

from __future__ import annotations

import contextlib
import os
from typing import Callable, Iterator

import torch
from sensilora.ops import OP_NAMES, forced_backend

# Per op: backends in order of preference where both can serve it, and why. No GPU has timed them yet,
# so the reasons are design and SASS/roofline arguments; a measured figure replaces them when one exists.
PREFERENCE: dict[str, tuple[tuple[str, ...], str]] = {
    "column_sumsq_": (
        ("triton", "cuda"),
        "both stream at the bandwidth roofline by design: Triton (32 tokens x 128 columns) tiles with vectorised "
        "loads; CUDA one 16-byte load per thread a row, 4 rows in flight, 40 registers (sm_90 SASS: LDG.E.128, "
        "no division per row). Triton first, tested under the interpreter at more layouts, until a GPU times both",
    ),
    "gram_": (("triton",), "only Triton implements it (tensor-core tl.dot on lower-triangle tiles)"),
    "inverse_diagonal": (("triton",), "only Triton implements it (cuSOLVER Cholesky, then the Triton column sums)"),
    "topk_mean_and_effective_rank": (
        ("cuda",),
        "CUDA: 2 passes over the data (11 then 10 bits; the second compacts the few percent of values left in the "
        "targets' buckets) and 1 over those candidates; an element costs one MATCH.ANY and REDUX.SUM with its warp, "
        "a warp a few native 32-bit shared atomics (exact fixed-point sums): H100 bound 7.3x below torch.sort's "
        "for weight-like data, 5.2x when every value is a candidate (benchmarks/roofline.py). Triton's 8 passes "
        "of (128, 16) one-hot tiles bound at 0.23x sort's: torch's sort reference serves where the extension is "
        "missing (SENSILORA_BACKEND=triton forces it) until a GPU times both",
    ),
    "saliency_topk_mean_and_effective_rank": (
        ("cuda",),
        "as topk_mean_and_effective_rank, the saliency (w*w)*reciprocal computed in the first two passes (the "
        "weight offset advanced by carry, no division or multiplication per element), the candidates stored: "
        "H100 bound 6.1x below sort's for CUDA (4.5x worst case), 0.21x for Triton",
    ),
}


# CPU tensors: the ops a CPU backend serves better than the torch reference (which stays the tests' oracle).
CPU_PREFERENCE: dict[str, tuple[tuple[str, ...], str]] = {
    "topk_mean_and_effective_rank": (
        ("cpu",),
        "two bincount passes and a sort of one 16-bit bucket instead of sorting every value",
    ),
    "saliency_topk_mean_and_effective_rank": (
        ("cpu",),
        "the reference sorts every saliency (1.3e8 for SmolLM2-135M obs); the cpu backend buckets them",
    ),
}


def runs_on(backend: str, device: str) -> bool:
    """Whether ``backend``'s kernels take ``device`` tensors (Triton on the CPU only under the interpreter)."""
    if device == "cuda":
        return backend in ("triton", "cuda")
    return backend == "cpu" or (backend == "triton" and os.environ.get("TRITON_INTERPRET") == "1")


def available_kernels() -> tuple[dict[str, dict[str, Callable]], list[str]]:
    """({backend: {op: kernel}} for the backends that load here, notes on the ones that do not)."""
    from . import cpu

    kernels, notes = {"cpu": cpu.KERNELS}, []
    try:
        from . import triton_backend
    except ImportError as error:
        notes.append(f"triton backend off: {error} (pip install triton)")
    else:
        kernels["triton"] = triton_backend.KERNELS
    from . import cuda

    if cuda.AVAILABLE:
        kernels["cuda"] = cuda.KERNELS
    else:
        notes.append(
            f"cuda backend off: {cuda.IMPORT_ERROR}; build it on a CUDA machine with "
            "pip install --no-deps --no-build-isolation -e ."
        )
    return kernels, notes


def choose(
    op: str, kernels: dict[str, dict[str, Callable]], forced: str | None, device: str = "cuda"
) -> tuple[str, str] | None:
    """(backend, reason) for ``op`` on ``device`` tensors, or None when the torch reference serves it."""
    order, why = (PREFERENCE if device == "cuda" else CPU_PREFERENCE).get(op, ((), ""))
    if forced is not None:
        if op in kernels.get(forced, {}) and runs_on(forced, device):
            return forced, f"forced by SENSILORA_BACKEND={forced}"
        return None
    for name in order:
        if op in kernels.get(name, {}):
            return name, why if name == order[0] else f"{order[0]} is preferred but not loaded here ({why})"
    return None


def _register_into(library: torch.library.Library, forced: str | None, devices: tuple[str, ...]) -> dict:
    kernels, notes = available_kernels()
    report: dict = {"kernels": {}, "notes": notes}
    for op in OP_NAMES:
        for device in devices:
            choice = choose(op, kernels, forced, device)
            if choice is None:
                continue
            torch.library.register_kernel(f"sensilora::{op}", device, kernels[choice[0]][op], lib=library)
            report["kernels"].setdefault(op, {})[device] = choice
    return report


_STATE: dict = {}


def register() -> dict:
    """Register the chosen kernels once per process; returns the report ``sensilora.ops`` expects:
    ``{"kernels": {op: {device: (backend, reason)}}, "notes": [...]}``."""
    if "report" not in _STATE:
        forced = forced_backend()
        if forced == "torch":
            _STATE["report"] = {"kernels": {}, "notes": ["SENSILORA_BACKEND=torch: no kernel registered"]}
        else:
            _STATE["library"] = torch.library.Library("sensilora", "IMPL")
            _STATE["report"] = _register_into(_STATE["library"], forced, ("cuda", "cpu"))
    return _STATE["report"]


@contextlib.contextmanager
def use_backend(name: str, device: str) -> Iterator[dict]:
    """Serve every op ``name`` implements on ``device`` tensors with ``name``'s kernels inside the block
    (a scoped registration, removed on exit): e.g. ``use_backend("triton", "cpu")`` under the interpreter."""
    library = torch.library.Library("sensilora", "IMPL")
    try:
        yield _register_into(library, name, (device,))
    finally:
        library._destroy()
