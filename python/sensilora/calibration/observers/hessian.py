"""The layer-wise Hessian proxy ``H = (2/N) X^T X`` (METHOD.md section 1): its diagonal (the paper's
statistic, ``mode="diag"``) and the full matrix with its damped inverse diagonal (``mode="obs"``)."""

from __future__ import annotations

from ...errors import SensiloraError
from ..inverse import INVERSE_CHUNK_BYTES, inverse_diagonals
from ..stats import InputStats, SensitivityStats
from .base import ColumnSumsq, Gram, Observer


class HessianDiagonal(Observer):
    """``diag(H)``: per input column the sum of squared activations (forward passes only)."""

    mode = "diag"
    statistic = "hessian"
    accumulator = ColumnSumsq


def with_inverse(inputs: dict[str, InputStats], hessians: dict, damp: float, keep: bool, chunk_bytes: int) -> None:
    """Set each input's ``diag((H + lambda I)^-1)`` and the damp used, from ``hessians`` ({key: H (d, d)
    fp32}, emptied as they are inverted so that each can be freed); ``keep`` leaves H in the result."""
    if keep:
        for key, hessian in hessians.items():
            inputs[key].hessian = hessian
    for key, (diagonal, used) in inverse_diagonals(hessians, damp, chunk_bytes).items():
        inputs[key].inverse_hessian_diag, inputs[key].damp = diagonal, used


class HessianInverse(Observer):
    """obs mode: the full ``X^T X`` per distinct input; finished into ``diag(H)`` and the damped inverse
    diagonal ``diag((H + lambda I)^-1)`` (chunked: at most ``inverse_chunk_bytes`` of grams at a time)."""

    mode = "obs"
    statistic = "hessian"
    accumulator = Gram
    keeps_grams = True

    def __init__(self, shapes, inverse_chunk_bytes: int = INVERSE_CHUNK_BYTES):
        super().__init__(shapes)
        self.inverse_chunk_bytes = inverse_chunk_bytes

    def finish(self, damp: float, keep_grams: bool = False) -> dict[str, InputStats]:
        results = super().finish(damp, keep_grams)
        hessians = {}
        for key, accumulator in self.accumulators.items():
            hessians[key] = accumulator.sums.mul_(2.0 / accumulator.num_tokens)  # H = (2/N) X^T X, in place
            accumulator.sums = None  # the dict holds the last reference: freed once stacked for inversion
        with_inverse(results, hessians, damp, keep_grams, self.inverse_chunk_bytes)
        return results

    @classmethod
    def merge(cls, runs: tuple[SensitivityStats, ...]) -> dict[str, InputStats]:
        """Merged like the diagonal, the Hessians alike, then inverted anew with the first run's damp;
        runs without their Hessians (calibrated without ``keep_grams``) cannot merge."""
        if any(s.hessian is None for run in runs for s in run.inputs.values()):
            raise SensiloraError(
                "obs-mode statistics merge only with their Hessians: calibrate each part with keep_grams=True "
                "(--keep-grams), or calibrate once on all the text"
            )
        inputs = super().merge(runs)
        hessians = {}
        for key, stats in inputs.items():
            weighted = sum(run.inputs[key].hessian.double() * run.inputs[key].num_tokens for run in runs)
            hessians[key] = (weighted / stats.num_tokens).float()
        with_inverse(inputs, hessians, runs[0].info.get("damp", 0.01), True, INVERSE_CHUNK_BYTES)
        return inputs
