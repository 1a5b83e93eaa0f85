"""Kernel backends as plugins: found once through entry points, never imported by name.

A backend package declares ``[project.entry-points."sensilora.backends"] NAME = "module:register"``.
``register()`` puts its kernels into torch's dispatcher (``torch.library.register_kernel`` on the
``sensilora::*`` ops, per dispatch key) and returns what it did, as plain data:
``{"kernels": {op: {device_type: (backend, reason)}}, "notes": [str, ...]}``. From then on the
dispatcher routes every call; this module only remembers the report for ``backend_report``.

``SENSILORA_BACKEND=torch`` skips the plugins (the reference serves every device); ``triton`` or
``cuda`` is read by the plugin, and a forced backend that no plugin provides raises here. A plugin that
fails to load warns once, with its error and the fix, and the reference serves its devices.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from importlib.metadata import entry_points

import torch

from ..errors import BackendUnavailableError
from .declarations import NAMESPACE, OP_NAMES

GROUP = "sensilora.backends"
BACKEND_NAMES = ("torch", "triton", "cuda", "cpu")
DEVICE_KEYS = {"cpu": "CPU", "cuda": "CUDA"}


@dataclass
class PluginStatus:
    """What ``load_backends`` found: per plugin, its report or the error that stopped it."""

    loaded: bool = False
    reports: dict[str, dict] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)


_STATUS = PluginStatus()


def forced_backend() -> str | None:
    """``SENSILORA_BACKEND`` (torch|triton|cuda|cpu), or None for the automatic choice."""
    value = os.environ.get("SENSILORA_BACKEND", "").strip().lower()
    if not value or value == "auto":
        return None
    if value not in BACKEND_NAMES:
        raise BackendUnavailableError(
            f"SENSILORA_BACKEND={value!r} is not a backend; use one of {', '.join(BACKEND_NAMES)} or unset it"
        )
    return value


def load_backends() -> PluginStatus:
    """Load every installed backend plugin once (idempotent; cheap after the first call)."""
    forced = forced_backend()
    if not _STATUS.loaded:
        _STATUS.loaded = True
        if forced != "torch":
            for entry in entry_points(group=GROUP):
                try:
                    _STATUS.reports[entry.name] = entry.load()()
                except Exception as error:  # a broken optional backend must not break the library
                    _STATUS.errors[entry.name] = f"{type(error).__name__}: {error}"
                    warnings.warn(
                        f"sensilora: kernel backend plugin {entry.name!r} ({entry.value}) failed to load "
                        f"({type(error).__name__}: {error}); every device uses the torch reference. Fix: reinstall it "
                        "(pip install -e '.[kernels]'), or set SENSILORA_BACKEND=torch to silence this",
                        RuntimeWarning,
                        stacklevel=2,
                    )
    if forced in ("triton", "cuda") and not any(_serves(forced)):
        why = "; ".join([*_STATUS.errors.values(), *(n for r in _STATUS.reports.values() for n in r.get("notes", []))])
        raise BackendUnavailableError(
            f"SENSILORA_BACKEND={forced} but no installed plugin registered {forced} kernels"
            f"{f' ({why})' if why else ''}; install sensilora_kernels with its requirements or unset SENSILORA_BACKEND"
        )
    return _STATUS


def _serves(backend: str):
    for report in _STATUS.reports.values():
        for devices in report.get("kernels", {}).values():
            yield from (choice[0] == backend for choice in devices.values())


def plugin_status() -> PluginStatus:
    return _STATUS


def backend_report() -> list[dict]:
    """Per op and device: the backend serving it and why. Each row is checked against the dispatcher
    (``torch._C._dispatch_has_kernel_for_dispatch_key``), so it reports what a call will really run."""
    load_backends()
    claimed: dict[tuple[str, str], tuple[str, str]] = {}
    for report in _STATUS.reports.values():
        for op, devices in report.get("kernels", {}).items():
            for device, choice in devices.items():
                claimed[(op, device)] = tuple(choice)
    rows = []
    for op in OP_NAMES:
        for device, key in DEVICE_KEYS.items():
            registered = torch._C._dispatch_has_kernel_for_dispatch_key(f"{NAMESPACE}::{op}", key)
            backend, reason = claimed.get((op, device), ("torch", "reference (no device kernel registered)"))
            if registered and backend == "torch":
                backend, reason = "other", f"a kernel registered for {key} by code outside the sensilora plugins"
            elif not registered and backend != "torch":
                backend, reason = "torch", f"{backend} was reported but no {key} kernel is registered"
            rows.append({"op": op, "device": device, "backend": backend, "reason": reason})
    return rows
