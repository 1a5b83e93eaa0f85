"""Calibration: statistics of each target layer's inputs from a few passes over text (METHOD.md section 1).

``calibrate`` composes three kinds of parts: an observer (``observers/``: what is measured), a pipeline
(``pipelines``: how batches reach the layers) and the lifecycle around the loop (``lifecycle``:
hooks and flags, checkpoint/resume, the process group, provenance). The batches come from ``batches``
(the forms users have them in) or ``text`` (files, datasets), the model from ``models``; the result is a
``SensitivityStats`` (``stats``), merged across runs by ``merge``. ``gradients`` measures the mean loss
gradient of each target weight, which the gradient allocation rules read.
"""

from .calibrator import calibrate, check_calibration_options
from .gradients import mean_gradients
from .merge import merge_statistics
from .pipelines import forward_kwargs
from .stats import InputStats, SensitivityStats

__all__ = [
    "InputStats",
    "SensitivityStats",
    "calibrate",
    "check_calibration_options",
    "forward_kwargs",
    "mean_gradients",
    "merge_statistics",
]
