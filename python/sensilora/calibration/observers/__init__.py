"""Observers: what a calibration measures, one module per statistic (METHOD.md section 1).

``OBSERVERS`` is the only list of them, by (mode, statistic); ``observer_class`` looks one up. Adding a
statistic is one new module with an ``Observer`` subclass and its line here: the pipelines, the
checkpoint, the all-reduce and the merge ask the observer, never the statistic's name.
"""

from __future__ import annotations

from ...errors import SensiloraError
from .base import Accumulator, ColumnSumsq, Gram, Observer
from .fisher import FisherDiagonal
from .hessian import HessianDiagonal, HessianInverse
from .robust import ClippedHessianDiagonal, RobustHessianDiagonal

OBSERVERS: dict[tuple[str, str], type[Observer]] = {
    (cls.mode, cls.statistic): cls
    for cls in (HessianDiagonal, HessianInverse, FisherDiagonal, RobustHessianDiagonal, ClippedHessianDiagonal)
}
MODES = tuple(dict.fromkeys(mode for mode, _ in OBSERVERS))
STATISTICS = tuple(dict.fromkeys(statistic for _, statistic in OBSERVERS))


def observer_class(mode: str, statistic: str) -> type[Observer]:
    """The observer that measures ``statistic`` in ``mode``, or a one-line refusal naming the valid pairs."""
    if mode not in MODES:
        raise SensiloraError(f"mode must be one of {MODES}, got {mode!r}")
    if statistic not in STATISTICS:
        raise SensiloraError(f"statistic must be one of {STATISTICS}, got {statistic!r}")
    found = OBSERVERS.get((mode, statistic))
    if found is None:
        modes = [m for m, s in OBSERVERS if s == statistic]
        raise SensiloraError(
            f"statistic={statistic!r} is measured in mode {' or '.join(repr(m) for m in modes)} only: "
            f"use it with mode={modes[0]!r}"
        )
    return found


__all__ = [
    "MODES",
    "OBSERVERS",
    "STATISTICS",
    "Accumulator",
    "ClippedHessianDiagonal",
    "ColumnSumsq",
    "FisherDiagonal",
    "Gram",
    "HessianDiagonal",
    "HessianInverse",
    "Observer",
    "RobustHessianDiagonal",
    "observer_class",
]
