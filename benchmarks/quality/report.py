"""The quality evaluation's tables (markdown) and figure (paired improvements, and metric against step)."""

from __future__ import annotations

from pathlib import Path

from sensilora.io import write_with_atomic

CURVE_METHODS = ("lora", "paper", "rank", "fisher", "eva", "adalora")


def _cell(value, digits: int = 4) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def report(rows: list[dict], decision: dict) -> str:
    """Per task: mean ± seed std, paired improvement over uniform LoRA [95 % interval], p and Holm p."""
    lines = []
    for task in dict.fromkeys(r["task"] for r in rows):
        subset = [r for r in rows if r["task"] == task]
        metric = subset[0]["metric"]
        lines += [
            f"\n### {task} ({metric}; improvement = better than uniform LoRA, paired by seed)\n",
            "| method | trainable params | max rank | "
            + metric
            + " (mean ± std) | improvement [95 % CI] | p | Holm p |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in subset:
            interval = "" if r["method"] == "lora" else (
                f"{r['vs_lora_improvement']:+.4f} [{r['vs_lora_ci_low']:+.4f}, {r['vs_lora_ci_high']:+.4f}]"
            )  # fmt: skip
            p = "" if r["method"] == "lora" else _cell(r["vs_lora_p"], 2)
            lines.append(
                f"| {r['method']} | {r['trainable_params']:,} | {_cell(r['max_rank'])} "
                f"| {r['mean']:.4f} ± {r['std']:.4f} | {interval} | {p} | {_cell(r.get('vs_lora_p_holm'), 2)} |"
            )
    verdict = (
        f"default by the rule ({decision['rule']}): **{decision['default']}**"
        if decision["beats_lora"]
        else f"no candidate beat uniform LoRA by the rule; the best-ranked safe one ships: **{decision['default']}**"
    )
    return "\n".join(
        lines + ["", verdict, f"qualified (score): {decision['qualified']}", f"safe (score): {decision.get('safe')}"]
    )


def plot(rows: list[dict], path: Path) -> None:
    """Top: each method's paired improvement over uniform LoRA with its 95 % interval; bottom: the mean
    metric against the training step for the main methods."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    tasks = list(dict.fromkeys(r["task"] for r in rows))
    figure = Figure(figsize=(5.8 * len(tasks), 7.5), constrained_layout=True)
    FigureCanvasAgg(figure)
    axes = figure.subplots(2, len(tasks), squeeze=False)
    for column, task in enumerate(tasks):
        subset = [r for r in rows if r["task"] == task]
        metric = subset[0]["metric"]
        others = [r for r in subset if r["method"] != "lora"]
        top = axes[0][column]
        for y, r in enumerate(others):
            low, high = r["vs_lora_ci_low"], r["vs_lora_ci_high"]
            color = "tab:green" if low > 0 else "tab:red" if high < 0 else "tab:grey"
            mean = r["vs_lora_improvement"]
            top.errorbar(mean, y, xerr=[[mean - low], [high - mean]], fmt="o", color=color, capsize=3)
        top.axvline(0.0, color="black", linewidth=1)
        top.set_yticks(range(len(others)), [r["method"] for r in others], fontsize=8)
        top.invert_yaxis()
        unit = "accuracy" if metric == "accuracy" else "perplexity (lower)"
        top.set_xlabel(f"improvement over uniform LoRA in {unit}; 95 % CI over {subset[0]['seeds']} paired seeds")
        top.set_title(f"{task}: green = better, red = worse, grey = undecided", fontsize=10)
        bottom = axes[1][column]
        for r in subset:
            if r["method"] in CURVE_METHODS:
                steps = [int(s) for s in r["curve"]]
                bottom.plot(steps, list(r["curve"].values()), marker="o", label=r["method"])
        bottom.set_xlabel("training step")
        bottom.set_ylabel(f"mean {metric}")
        bottom.legend(fontsize=8)
    write_with_atomic(path, lambda tmp: figure.savefig(tmp, format="png", dpi=110))
