"""Merging the statistics files of separate calibration runs (``sensilora merge``) as if one run had seen
all their tokens; what each statistic merges from is its observer's (``Observer.merge``)."""

from __future__ import annotations

from ..errors import SensiloraError
from .batches import combined_fingerprint
from .observers import observer_class
from .stats import SensitivityStats


def merge_statistics(first: SensitivityStats, *others: SensitivityStats) -> SensitivityStats:
    """Statistics of separate calibration runs combined as if one run had seen all their tokens: each input's
    ``(2/N) sum x^2`` re-weighted by its token count. obs mode: the runs must have kept their Hessians
    (``calibrate(..., keep_grams=True)``), which merge the same way before the damped inverse is taken anew
    (damp: the first run's); obs files without them hold only the inverse diagonal and are refused."""
    runs = (first, *others)
    for other in others:
        if other.mode != first.mode:
            raise SensiloraError(f"cannot merge {first.mode}-mode and {other.mode}-mode statistics; calibrate alike")
        for setting in ("statistic", "exclude_first"):
            if other.info.get(setting, _DEFAULTS[setting]) != first.info.get(setting, _DEFAULTS[setting]):
                raise SensiloraError(
                    f"cannot merge statistics calibrated with different {setting} "
                    f"({first.info.get(setting)!r} vs {other.info.get(setting)!r}); merge files calibrated alike"
                )
        if other.module_shapes != first.module_shapes or other.module_inputs != first.module_inputs:
            raise SensiloraError(
                f"cannot merge statistics of different models or target modules ({first.model_name!r} vs "
                f"{other.model_name!r}); merge files calibrated on the same model and targets"
            )
        if other.info.get("model_config_sha256") != first.info.get("model_config_sha256"):
            raise SensiloraError(
                f"cannot merge statistics of models with different configurations ({first.model_name!r} vs "
                f"{other.model_name!r}: config hashes differ); merge files calibrated on the same model"
            )
    observer = observer_class(first.mode, first.info.get("statistic", "hessian"))
    inputs = observer.merge(runs)
    hashes = [run.info.get("data_sha256") for run in runs]
    repeated = sorted({h for h in hashes if h is not None and hashes.count(h) > 1})
    if repeated:
        raise SensiloraError(
            f"the same calibration data appears more than once among the files (data hash {repeated[0][:12]}...): "
            "merging it would count its tokens twice; give each file once"
        )
    info = {
        "merged_from": [run.info for run in runs],
        "tokens": sum(run.info.get("tokens", 0) for run in runs),
        "batches": sum(run.info.get("batches", 0) for run in runs),
        "statistic": first.info.get("statistic"),
        "exclude_first": first.info.get("exclude_first"),
        "model_config_sha256": first.info.get("model_config_sha256"),
        "data_sha256": combined_fingerprint(sorted(h for h in hashes if h is not None)),
    }
    if first.mode == "obs":
        info["damp"] = first.info.get("damp", 0.01)
    merged = SensitivityStats(
        first.mode, dict(first.module_shapes), dict(first.module_inputs), inputs, first.model_name, info
    )
    merged.validate("merged statistics")
    return merged


_DEFAULTS = {"statistic": "hessian", "exclude_first": 0}
