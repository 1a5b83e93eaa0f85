"""Per-layer rank heatmaps under each metric, like the paper's Figure 3."""

from __future__ import annotations

import io

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure

from ..calibration.targets import layer_and_kind


def rank_grid(ranks: dict[str, int]) -> tuple[np.ndarray, list[int], list[str]]:
    """(kinds x layers) array of ranks (nan where a kind is absent), the layer indices and kind names."""
    cells = {layer_and_kind(name): rank for name, rank in ranks.items()}
    layers = sorted({layer for layer, _ in cells if layer is not None})
    kinds = list(dict.fromkeys(kind for _, kind in cells))
    grid = np.full((len(kinds), max(len(layers), 1)), np.nan)
    for (layer, kind), rank in cells.items():
        grid[kinds.index(kind), layers.index(layer) if layer is not None else 0] = rank
    return grid, layers, kinds


def render_rank_maps(panels: dict[str, dict[str, int]], title: str = "") -> bytes:
    """PNG bytes: one heatmap per metric (module kind x layer, colour = rank on a log scale)."""
    figure = Figure(figsize=(12, 2.2 * len(panels) + 0.6), constrained_layout=True)
    FigureCanvasAgg(figure)
    vmax = max(max(ranks.values()) for ranks in panels.values())
    axes = figure.subplots(len(panels), 1, squeeze=False)[:, 0]
    image = None
    for axis, (label, ranks) in zip(axes, panels.items()):
        grid, layers, kinds = rank_grid(ranks)
        image = axis.imshow(
            grid, aspect="auto", cmap="viridis", norm=LogNorm(vmin=1, vmax=max(vmax, 2)), interpolation="nearest"
        )
        axis.set_title(label, fontsize=10, loc="left")
        axis.set_yticks(range(len(kinds)), kinds, fontsize=7)
        step = max(1, len(layers) // 16)
        axis.set_xticks(range(0, len(layers), step), [str(layers[i]) for i in range(0, len(layers), step)], fontsize=7)
    axes[-1].set_xlabel("layer")
    figure.colorbar(image, ax=list(axes), label="LoRA rank (log scale)", shrink=0.8)
    if title:
        figure.suptitle(title, fontsize=11)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    return buffer.getvalue()
