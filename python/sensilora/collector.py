"""The running fp32 sums of one calibration: one accumulator per distinct input tensor, fed by the hooks."""

from __future__ import annotations

import math
import weakref

import torch

from . import ops
from .errors import SensiloraError


class Accumulator:
    """Running fp32 sums for one distinct input tensor (shared by the modules that read it)."""

    def __init__(self, key: str, d_in: int, device: torch.device, mode: str):
        self.key = key
        self.mode = mode
        self.sumsq = torch.zeros(d_in, dtype=torch.float32, device=device) if mode == "diag" else None
        self.gram = torch.zeros(d_in, d_in, dtype=torch.float32, device=device) if mode == "obs" else None
        self.num_tokens = 0
        self.last_input: weakref.ref | None = None

    def add(
        self, x: torch.Tensor, mask: torch.Tensor | None, num_tokens: int, row_weight: torch.Tensor | None = None
    ) -> None:
        if self.mode == "diag":
            ops.column_sumsq_(self.sumsq, x, mask, row_weight)
        else:
            ops.gram_(self.gram, x, mask)
        self.num_tokens += num_tokens
        self.last_input = weakref.ref(x)

    @property
    def sums(self) -> torch.Tensor:
        """The running sum: (d_in,) squared columns in diag mode, (d_in, d_in) X^T X in obs mode."""
        return self.sumsq if self.mode == "diag" else self.gram

    def column_sums(self) -> torch.Tensor:
        return self.sumsq if self.mode == "diag" else self.gram.diagonal()


class Collector:
    """State shared by the hooks of one calibration run."""

    def __init__(self, mode: str, shapes: dict[str, tuple[int, int]]):
        self.mode = mode
        self.shapes = shapes
        self.by_module: dict[str, Accumulator] = {}
        self.accumulators: dict[str, Accumulator] = {}
        self.mask: torch.Tensor | None = None
        self.real_tokens = 0
        self._mask_on: dict[torch.device, torch.Tensor] = {}

    def start_batch(self, mask: torch.Tensor | None, real_tokens: int) -> None:
        self.mask = mask
        self.real_tokens = real_tokens
        self._mask_on = {}

    def _mask_for(self, name: str, x: torch.Tensor) -> tuple[torch.Tensor | None, int]:
        lead = tuple(x.shape[:-1])
        if self.mask is None:
            return None, math.prod(lead)
        # The input's token axes must be the mask's (batch, seq), or those flattened batch-major: an equal
        # element count is not enough (a sequence-first (seq, batch, d) input would be masked transposed).
        if lead != tuple(self.mask.shape) and lead != (self.mask.numel(),):
            raise SensiloraError(
                f"module {name!r} received inputs with token axes {lead} but the batch's attention_mask has shape "
                f"{tuple(self.mask.shape)}; sensilora needs batch-first inputs with one row per token (sequence-first, "
                "packed or variable-length inputs are not supported): pass padded batch-first batches with their "
                "attention_mask"
            )
        if x.device not in self._mask_on:
            self._mask_on[x.device] = self.mask.to(x.device)
        return self._mask_on[x.device].reshape(lead), self.real_tokens

    def observe(self, name: str, x: torch.Tensor, row_weight: torch.Tensor | None = None) -> None:
        """Add module ``name``'s input ``x`` (..., d_in), each token's squares weighted by ``row_weight``
        (fp32 x.shape[:-1], the loss-aware statistic's; None for 1)."""
        accumulator = self.by_module.get(name)
        if accumulator is None:  # first batch: share with a module that read this very tensor (weighted
            # inputs never share: they carry their module's own output gradients)
            readers = self.accumulators.values() if row_weight is None else ()
            shared = next((a for a in readers if a.last_input is not None and a.last_input() is x), None)
            if shared is not None:
                self.by_module[name] = shared
                return
            accumulator = Accumulator(name, self.shapes[name][1], x.device, self.mode)
            self.accumulators[name] = self.by_module[name] = accumulator
        elif accumulator.key != name:
            if accumulator.last_input is None or accumulator.last_input() is not x:
                raise SensiloraError(
                    f"module {name!r} shared its input with {accumulator.key!r} in the first batch but not "
                    "later; calibrate this model with target_modules naming only one of them"
                )
            return
        if not torch.is_floating_point(x):
            raise SensiloraError(f"module {name!r} received a {x.dtype} input; expected floating point activations")
        mask, tokens = self._mask_for(name, x)
        accumulator.add(x, mask, tokens, row_weight)

    def check_finite(self, batch_index: int) -> None:
        accumulators = list(self.accumulators.values())
        device = accumulators[0].column_sums().device
        totals = torch.stack([a.column_sums().sum().to(device) for a in accumulators])  # one sync per batch
        if bool(torch.isfinite(totals).all()):
            return
        bad = next(a for a, t in zip(accumulators, totals.tolist()) if not math.isfinite(t))
        readers = [n for n, a in self.by_module.items() if a is bad]
        raise SensiloraError(
            f"non-finite (NaN/Inf) activations entering module(s) {readers} in calibration batch {batch_index}; "
            "the model overflows in this dtype on this text (or a weight outside the target modules is NaN/Inf): "
            "calibrate in float32/bfloat16 or drop that batch"
        )
