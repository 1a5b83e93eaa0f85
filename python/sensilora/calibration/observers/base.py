"""What an observer is: the running fp32 sums of one statistic, the hooks that feed them, and how they are
saved, reduced, finished and merged (METHOD.md section 1; one subclass per statistic in this package).

An observer owns one accumulator per distinct input tensor (q/k/v read one tensor: one accumulator) and
knows everything that depends on the statistic; the pipelines (``calibration.pipelines``) only feed it
batches, inside ``with observer.batch(mask, real_tokens):`` so that the hooks always know which tokens count.
"""

from __future__ import annotations

import contextlib
import math
import weakref
from collections.abc import Callable, Iterator
from typing import Any, ClassVar

import torch
from torch import nn

from ... import ops
from ...errors import SensiloraError
from ..stats import InputStats, SensitivityStats


class Accumulator:
    """Running fp32 sums for one distinct input tensor (shared by the modules that read it).

    ``sums`` is the state (a tensor of ``shape(d_in)``), ``num_tokens`` the real tokens added."""

    def __init__(self, key: str, d_in: int, device: torch.device):
        self.key = key
        self.sums = torch.zeros(self.shape(d_in), dtype=torch.float32, device=device)
        self.num_tokens = 0
        self.last_input: weakref.ref | None = None

    @staticmethod
    def shape(d_in: int) -> tuple[int, ...]:
        raise NotImplementedError

    def add(self, x: torch.Tensor, mask: torch.Tensor | None, num_tokens: int, row_weight: torch.Tensor | None):
        self._accumulate(x, mask, row_weight)
        self.num_tokens += num_tokens
        self.last_input = weakref.ref(x)

    def _accumulate(self, x, mask, row_weight) -> None:
        raise NotImplementedError

    def column_sums(self) -> torch.Tensor:
        """(d_in,) fp32: the sum of each input column's squares."""
        raise NotImplementedError


class ColumnSumsq(Accumulator):
    """diag statistics: (d_in,) sums of squared columns, each token optionally weighted."""

    @staticmethod
    def shape(d_in: int) -> tuple[int, ...]:
        return (d_in,)

    def _accumulate(self, x, mask, row_weight) -> None:
        ops.column_sumsq_(self.sums, x, mask, row_weight)

    def column_sums(self) -> torch.Tensor:
        return self.sums


class Gram(Accumulator):
    """obs statistics: the (d_in, d_in) ``X^T X`` (lower triangle summed, mirrored by the op)."""

    @staticmethod
    def shape(d_in: int) -> tuple[int, ...]:
        return (d_in, d_in)

    def _accumulate(self, x, mask, row_weight) -> None:
        ops.gram_(self.sums, x, mask)

    def column_sums(self) -> torch.Tensor:
        return self.sums.diagonal()


class Observer:
    """One statistic of one calibration run. Subclasses set the class attributes and override the hooks.

    Capabilities (class attributes, read by the pipelines and the lifecycle instead of pairwise rules):
    ``mode`` and ``statistic`` (what ``calibrate`` is asked for), ``accumulator`` (the sums' type),
    ``needs_backward`` (a backward pass per batch: no layer-by-layer pipeline), ``needs_logits`` (the
    forward must compute every position's logits), ``shares_inputs`` (modules reading one tensor share
    its sums), ``keeps_grams`` (``keep_grams=True`` is meaningful)."""

    mode: ClassVar[str]
    statistic: ClassVar[str]
    accumulator: ClassVar[type[Accumulator]]
    needs_backward: ClassVar[bool] = False
    needs_logits: ClassVar[bool] = False
    shares_inputs: ClassVar[bool] = True
    keeps_grams: ClassVar[bool] = False

    def __init__(self, shapes: dict[str, tuple[int, int]]):
        self.shapes = shapes
        self.by_module: dict[str, Accumulator] = {}
        self.accumulators: dict[str, Accumulator] = {}
        self._mask: torch.Tensor | None = None
        self._real_tokens = 0
        self._mask_on: dict[torch.device, torch.Tensor] = {}
        self._in_batch = False

    # --- what the pipelines call -------------------------------------------------------------------------
    def attach(self, targets: dict[str, nn.Module]) -> list:
        """Install this statistic's hooks on ``targets``; returns the handles (removed by the caller)."""
        return [
            module.register_forward_pre_hook(lambda _module, args, _name=name: self.observe(_name, args[0]))
            for name, module in targets.items()
        ]

    def passes(self, model: nn.Module) -> contextlib.AbstractContextManager:
        """The autograd context of the calibration passes (forward only: no graph)."""
        return torch.no_grad()

    def prepare(self, model: nn.Module, batch: dict[str, Any]) -> dict[str, Any]:
        """The batch as this statistic's forward takes it (a forward-only statistic drops the labels)."""
        return {key: value for key, value in batch.items() if key != "labels"}

    def forward(self, model: nn.Module, inputs: dict[str, Any], extra: dict[str, Any]) -> None:
        """One calibration pass of the whole model over one batch (the hooks collect)."""
        model(**inputs, **extra)

    @contextlib.contextmanager
    def batch(self, mask: torch.Tensor | None, real_tokens: int) -> Iterator[None]:
        """Inside: the hooks count the tokens of ``mask`` ((B, T) bool, None for every token), ``real_tokens``
        of them. Outside, a hook that fires is an error (a forward nobody announced)."""
        self._mask, self._real_tokens, self._mask_on, self._in_batch = mask, real_tokens, {}, True
        try:
            yield
        finally:
            self._mask, self._mask_on, self._in_batch = None, {}, False

    def observe(self, name: str, x: torch.Tensor, row_weight: torch.Tensor | None = None) -> None:
        """Add module ``name``'s input ``x`` (..., d_in), each token's squares weighted by ``row_weight``
        (fp32 x.shape[:-1]; None for 1)."""
        if not self._in_batch:
            raise SensiloraError(f"module {name!r} ran outside a calibration batch; this is a sensilora bug")
        accumulator = self.by_module.get(name)
        if accumulator is None:  # first batch: share with a module that read this very tensor
            readers = self.accumulators.values() if self.shares_inputs else ()
            shared = next((a for a in readers if a.last_input is not None and a.last_input() is x), None)
            if shared is not None:
                self.by_module[name] = shared
                return
            accumulator = self.accumulator(name, self.shapes[name][1], x.device)
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
        accumulator.add(x, mask, tokens, self._row_weight(x, mask, row_weight))

    def _row_weight(self, x: torch.Tensor, mask: torch.Tensor | None, row_weight: torch.Tensor | None):
        """The per-token weights of ``x``'s squares (None for 1): the caller's; a statistic may derive its own."""
        return row_weight

    def _mask_for(self, name: str, x: torch.Tensor) -> tuple[torch.Tensor | None, int]:
        lead = tuple(x.shape[:-1])
        if self._mask is None:
            return None, math.prod(lead)
        # The input's token axes must be the mask's (batch, seq), or those flattened batch-major: an equal
        # element count is not enough (a sequence-first (seq, batch, d) input would be masked transposed).
        if lead != tuple(self._mask.shape) and lead != (self._mask.numel(),):
            raise SensiloraError(
                f"module {name!r} received inputs with token axes {lead} but the batch's attention_mask has shape "
                f"{tuple(self._mask.shape)}; sensilora needs batch-first inputs with one row per token "
                "(sequence-first, packed or variable-length inputs are not supported): pass padded batch-first "
                "batches with their attention_mask"
            )
        if x.device not in self._mask_on:
            self._mask_on[x.device] = self._mask.to(x.device)
        return self._mask_on[x.device].reshape(lead), self._real_tokens

    def check_finite(self, batch_index: int) -> None:
        """Refuse NaN/Inf sums after a batch (one host synchronisation); nothing to check before any module ran."""
        accumulators = list(self.accumulators.values())
        if not accumulators:
            return
        device = accumulators[0].sums.device
        totals = torch.stack([a.column_sums().sum().to(device) for a in accumulators])
        if bool(torch.isfinite(totals).all()):
            return
        bad = next(a for a, t in zip(accumulators, totals.tolist()) if not math.isfinite(t))
        readers = [n for n, a in self.by_module.items() if a is bad]
        raise SensiloraError(
            f"non-finite (NaN/Inf) activations entering module(s) {readers} in calibration batch {batch_index}; "
            "the model overflows in this dtype on this text (or a weight outside the target modules is NaN/Inf): "
            "calibrate in float32/bfloat16 or drop that batch"
        )

    # --- state: checkpoints and the process group ---------------------------------------------------------
    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict]:
        """(tensors ``{"i.sums"}`` on the CPU, JSON-able ``{"inputs": [...], "modules": {...}}``)."""
        keys = sorted(self.accumulators)
        tensors = {f"{i}.sums": self.accumulators[k].sums.detach().cpu().contiguous() for i, k in enumerate(keys)}
        layout = {
            "inputs": [{"key": k, "num_tokens": self.accumulators[k].num_tokens} for k in keys],
            "modules": {name: accumulator.key for name, accumulator in self.by_module.items()},
        }
        return tensors, layout

    def load_state_dict(self, tensors: dict[str, torch.Tensor], layout: dict, devices: dict[str, torch.device]):
        """Restore ``state_dict``'s sums into this (empty) observer, each on ``devices[its key]``."""
        for index, entry in enumerate(layout["inputs"]):
            key = entry["key"]
            sums = tensors[f"{index}.sums"]
            accumulator = self.accumulator(key, sums.shape[0], devices[key])
            if tuple(sums.shape) != tuple(accumulator.sums.shape):
                raise SensiloraError(
                    f"checkpoint sums of {key!r} have shape {tuple(sums.shape)}, not a {self.mode} sum"
                )
            accumulator.sums.copy_(sums)
            accumulator.num_tokens = int(entry["num_tokens"])
            self.accumulators[key] = accumulator
        self.by_module.update({name: self.accumulators[key] for name, key in layout["modules"].items()})

    def reduce(self, all_reduce: Callable[[torch.Tensor], None]) -> None:
        """Sum every accumulator across a process group: ``all_reduce`` sums a tensor in place; the sums
        and the token counts are both plain SUM reductions."""
        for key in sorted(self.accumulators):
            accumulator = self.accumulators[key]
            all_reduce(accumulator.sums)
            tokens = torch.tensor([accumulator.num_tokens], device=accumulator.sums.device, dtype=torch.int64)
            all_reduce(tokens)
            accumulator.num_tokens = int(tokens)

    # --- the result -----------------------------------------------------------------------------------------
    def finish(self, damp: float, keep_grams: bool = False) -> dict[str, InputStats]:
        """The statistics of every input: ``(2/N) sum x^2`` per column (METHOD.md section 1)."""
        results: dict[str, InputStats] = {}
        for key, accumulator in self.accumulators.items():
            if accumulator.num_tokens == 0:
                raise SensiloraError(f"module {key!r} saw no real tokens during calibration; check the model's forward")
            scale = 2.0 / accumulator.num_tokens
            results[key] = InputStats(
                hessian_diag=(accumulator.column_sums() * scale).clone(), num_tokens=accumulator.num_tokens
            )
        return results

    @classmethod
    def merge(cls, runs: tuple[SensitivityStats, ...]) -> dict[str, InputStats]:
        """Inputs of separate runs combined as one run over all their tokens: each ``(2/N) sum x^2``
        re-weighted by its token count."""
        inputs = {}
        for key in runs[0].inputs:
            tokens = sum(run.inputs[key].num_tokens for run in runs)
            total = sum(run.inputs[key].hessian_diag.double() * run.inputs[key].num_tokens for run in runs)
            inputs[key] = InputStats(hessian_diag=(total / tokens).float(), num_tokens=tokens)
        return inputs
