"""sensilora_kernels: Triton and CUDA kernels for the ``sensilora::*`` ops, as device backends.

Importing this package registers the chosen kernels in torch's dispatcher (``registry.register``), so
CUDA tensors use them with no code change; ``sensilora`` also finds ``register`` through its
``sensilora.backends`` entry point and calls it once, so installing the package is enough. Triton runs
on CUDA tensors, or on CPU tensors under ``TRITON_INTERPRET=1`` (tests, ``registry.use_backend``).
"""

from __future__ import annotations

from .registry import PREFERENCE, register, use_backend

register()

__all__ = ["PREFERENCE", "register", "use_backend"]
