"""A report a person would rather look at than read (``sensilora report``), and the compact summary that
``sensilora allocate`` prints: where the rank budget went, by module type and by layer."""

from __future__ import annotations

import io
from collections import defaultdict

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure

from ..allocation.metrics import METRIC_LABELS
from ..allocation.result import RankAllocation
from ..calibration.targets import layer_and_kind
from .plots import rank_grid


def budget_by_kind(allocation: RankAllocation) -> dict[str, dict[str, float]]:
    """Per module type: matrices, mean rank, and its share of the trainable parameters (uniform LoRA's beside)."""
    rows: dict[str, dict[str, float]] = defaultdict(lambda: {"matrices": 0, "rank_sum": 0, "params": 0, "uniform": 0})
    for name, rank in allocation.ranks.items():
        row = rows[layer_and_kind(name)[1]]
        cost = sum(allocation.shapes[name])
        row["matrices"] += 1
        row["rank_sum"] += rank
        row["params"] += rank * cost
        row["uniform"] += allocation.avg_rank * cost
    total, uniform = allocation.trainable_parameters, allocation.uniform_parameters
    return {
        kind: {
            "matrices": r["matrices"],
            "mean_rank": r["rank_sum"] / r["matrices"],
            "share": r["params"] / total,
            "uniform_share": r["uniform"] / uniform,
        }  # fmt: skip
        for kind, r in rows.items()
    }


def full_table(allocation: RankAllocation) -> str:
    """Every module's shape, metrics (eqs. 8-10), theta (eq. 14) and rank, one line each."""
    header = (
        f"{'module':<44} {'d_out x d_in':>13} {'S_global':>10} {'S_topk':>10} {'S_eff':>10} {'theta':>10} {'rank':>5}"
    )
    lines = [header, "-" * len(header)]
    for name, rank in allocation.ranks.items():
        m = allocation.metrics[name]
        d_out, d_in = allocation.shapes[name]
        lines.append(
            f"{name[-44:]:<44} {f'{d_out}x{d_in}':>13} {m.global_sensitivity:>10.3e} {m.topk:>10.3e} "
            f"{m.effective_rank:>10d} {allocation.theta[name]:>10.3e} {rank:>5d}"
        )
    return "\n".join(lines)


def summary_lines(allocation: RankAllocation) -> list[str]:
    """The rank sum and trainable parameters beside uniform LoRA's: the lines ``sensilora allocate`` ends with."""
    ranks = allocation.ranks.values()
    ours, uniform = allocation.trainable_parameters, allocation.uniform_parameters
    return [
        f"matrices: {len(allocation.ranks)}   rank sum: {sum(ranks)} (uniform LoRA: {allocation.avg_rank} x "
        f"{len(allocation.ranks)} = {allocation.avg_rank * len(allocation.ranks)})   "
        f"min/max rank: {min(ranks)}/{max(ranks)}",
        f"trainable LoRA parameters: sensilora {ours:,} vs uniform LoRA r={allocation.avg_rank} {uniform:,} "
        f"({ours / uniform:.3f}x; budget: {allocation.config.budget})",
    ]


EXTREME_SHARE = 2.0  # a module type past this multiple of its uniform LoRA share is flagged


def extreme_allocation(allocation: RankAllocation, factor: float = EXTREME_SHARE) -> str | None:
    """One line naming the module types that take more than ``factor`` times their share of the trainable
    parameters under uniform LoRA (with the largest matrix and the likely cause), or None if none does."""
    rows = budget_by_kind(allocation)
    heavy = sorted((k for k, r in rows.items() if r["share"] > factor * r["uniform_share"]),
                   key=lambda k: -rows[k]["share"])  # fmt: skip
    if not heavy:
        return None
    named = ", ".join(
        f"{kind} {rows[kind]['share']:.1%} (uniform LoRA {rows[kind]['uniform_share']:.1%})" for kind in heavy
    )
    largest = max(allocation.ranks, key=lambda n: allocation.ranks[n] * sum(allocation.shapes[n]))
    largest_share = allocation.ranks[largest] * sum(allocation.shapes[largest]) / allocation.trainable_parameters
    remedy = (
        "--aggregation rank (the default) tempers it"
        if allocation.config.aggregation == "paper"
        else "--temperature 0.5 or a --max-rank cap tempers it"
    )
    return (
        f"an extreme allocation: {named} of the trainable parameters; the largest matrix, {largest} "
        f"(rank {allocation.ranks[largest]}), alone takes {largest_share:.1%}; the likely cause is a few "
        f"outlier activations (massive activations at attention-sink tokens) dominating these inputs' "
        f"Hessians; {remedy} (sensilora report shows where the budget went)"
    )


def summary_table(allocation: RankAllocation) -> str:
    """The compact form: one line per module type, then mean rank per layer on one line."""
    lines = [f"{'module type':<28} {'matrices':>8} {'mean rank':>9} {'share of params':>15} {'uniform LoRA':>12}"]
    for kind, row in budget_by_kind(allocation).items():
        lines.append(f"{kind:<28} {row['matrices']:>8d} {row['mean_rank']:>9.2f} {row['share']:>15.1%} "
                     f"{row['uniform_share']:>12.1%}")  # fmt: skip
    by_layer: dict[int, list[int]] = defaultdict(list)
    for name, rank in allocation.ranks.items():
        layer = layer_and_kind(name)[0]
        if layer is not None:
            by_layer[layer].append(rank)
    if by_layer:
        means = " ".join(f"{layer}:{np.mean(r):.1f}" for layer, r in sorted(by_layer.items()))
        lines.append(f"mean rank per layer: {means}")
    return "\n".join(lines)


def _heatmap(axis, values: dict[str, float], title: str, log: bool) -> object:
    grid, layers, kinds = rank_grid(values)
    positive = grid[np.isfinite(grid) & (grid > 0)]
    norm = (
        LogNorm(vmin=positive.min(), vmax=max(positive.max(), positive.min() * 1.01)) if log and positive.size else None
    )
    image = axis.imshow(grid, aspect="auto", cmap="viridis", norm=norm, interpolation="nearest")
    axis.set_title(title, fontsize=9, loc="left")
    axis.set_yticks(range(len(kinds)), kinds, fontsize=6)
    step = max(1, len(layers) // 16)
    axis.set_xticks(range(0, len(layers), step), [str(layers[i]) for i in range(0, len(layers), step)], fontsize=6)
    axis.set_xlabel("layer", fontsize=7)
    return image


def render_report(allocation: RankAllocation) -> bytes:
    """PNG bytes of one page: heatmaps (layer x module type) of the ranks and of each metric, the budget
    per module type against uniform LoRA's, the top modules by each metric, and the run's key figures."""
    figure = Figure(figsize=(14, 11), constrained_layout=True)
    FigureCanvasAgg(figure)
    grid = figure.add_gridspec(4, 2, width_ratios=(3, 2))
    panels = [("LoRA rank", allocation.ranks, True)]
    panels += [
        (label, {n: getattr(m, field) for n, m in allocation.metrics.items()}, True)
        for field, label in METRIC_LABELS.items()
    ]
    for row, (title, values, log) in enumerate(panels):
        axis = figure.add_subplot(grid[row, 0])
        figure.colorbar(_heatmap(axis, values, title, log), ax=axis, shrink=0.9)
    shares = budget_by_kind(allocation)
    bars = figure.add_subplot(grid[0:2, 1])
    kinds = list(shares)
    positions = np.arange(len(kinds))
    bars.barh(positions - 0.2, [shares[k]["share"] for k in kinds], height=0.4, label="Sensitivity-LoRA")
    bars.barh(positions + 0.2, [shares[k]["uniform_share"] for k in kinds], height=0.4, label="uniform LoRA")
    bars.set_yticks(positions, kinds, fontsize=7)
    bars.invert_yaxis()
    bars.set_xlabel("share of the trainable parameters")
    bars.legend(fontsize=8)
    bars.set_title("where the budget went", fontsize=9, loc="left")
    text = figure.add_subplot(grid[2:, 1])
    text.axis("off")
    lines = [
        f"model: {allocation.model_name}   mode: {allocation.mode}   avg rank: {allocation.avg_rank}",
        f"trainable parameters: {allocation.trainable_parameters:,} (uniform LoRA {allocation.uniform_parameters:,})",
        f"ranks: {min(allocation.ranks.values())}..{max(allocation.ranks.values())}   "
        f"calibration tokens: {allocation.calibration.get('tokens', '?')}",
        f"config: {', '.join(f'{k}={v}' for k, v in allocation.config.to_dict().items())}",
        "",
    ]
    for field, label in {None: "theta", **METRIC_LABELS}.items():
        source = allocation.theta if field is None else {n: getattr(m, field) for n, m in allocation.metrics.items()}
        top = sorted(source, key=lambda n: -source[n])[:4]
        lines.append(f"top by {label}: " + ", ".join(f"{n} (r={allocation.ranks[n]})" for n in top))
    text.text(0, 1, "\n".join(lines), va="top", fontsize=7, family="monospace", wrap=True)
    figure.suptitle(f"Sensitivity-LoRA allocation report: {allocation.model_name}", fontsize=12)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    return buffer.getvalue()
