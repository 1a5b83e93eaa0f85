"""HyperAdaLoRA against AdaLoRA, Sensitivity-LoRA's default, uniform LoRA and EVA (issue 15), under the
evaluation protocol of run_quality: same seeds, same data order per seed, paired differences.

    python -m benchmarks.quality.run_quality --compare hyperadalora

Contrasts named before the run (paired t-tests over seeds, Holm over the six):
- C1 speed: HyperAdaLoRA - AdaLoRA at the first checkpoint, per task (the paper claims faster convergence);
- C2 quality: HyperAdaLoRA - AdaLoRA at the last step, per task (the paper claims no loss of quality);
- C3 ours: Sensitivity-LoRA's default (paper) - HyperAdaLoRA at the last step, per task;
- C4, C5: C1 and C2 with AdaLoRA and HyperAdaLoRA each at its own learning rate, chosen on dev (seed 0)
  from ``nlu_lrs_own`` by LoRA's rule (NLU only; NLG has no dev split). Added, before their runs, once
  the first runs showed Λ (which starts at 0) still near 0 after 120 steps at LoRA's learning rate;
- C6, C7: Sensitivity-LoRA's default against uniform LoRA and against HyperAdaLoRA, every method at its
  own dev-selected rate (NLU), added before their runs once AdaLoRA's dev search (best at 2e-2, accuracy
  0.42) showed that LoRA's own grid (best 2e-3, its top, 0.28) had stopped too low.
Descriptive: each method's metric at every checkpoint against the step and against the mean wall-clock
seconds of training to reach it; trainable, hypernetwork and final adapter parameters.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from sensilora.io import write_with_atomic

from benchmarks.quality import methods as M
from benchmarks.quality.paired import holm, paired_difference

METHODS = ("lora", "paper", "eva", "adalora", "hyperadalora")
OWN_LR_METHODS = tuple(f"{method}{M.OWN_LR}" for method in ("lora", "paper", "adalora", "hyperadalora"))
NLU_METHODS = (*METHODS, *OWN_LR_METHODS)  # NLU has a dev split to choose their learning rates on
CONTRASTS = (  # name, method, baseline, checkpoint ("first" or "last"); a task lacking a method skips it
    ("C1 speed", "hyperadalora", "adalora", "first"),
    ("C2 quality", "hyperadalora", "adalora", "last"),
    ("C3 ours", "paper", "hyperadalora", "last"),
    ("C4 speed, own lr", "hyperadalora@own-lr", "adalora@own-lr", "first"),
    ("C5 quality, own lr", "hyperadalora@own-lr", "adalora@own-lr", "last"),
    ("C6 ours vs LoRA, own lr", "paper@own-lr", "lora@own-lr", "last"),
    ("C7 ours vs HyperAdaLoRA, own lr", "paper@own-lr", "hyperadalora@own-lr", "last"),
)


def side_by_side_step_seconds(context, lr: float, rounds: int = 8, warmup: int = 2) -> dict[str, float]:
    """Median seconds of one training step (forward, backward, AdamW, the method's per-step hook) of each
    method in METHODS, timed round-robin in this process on the same batches: ratios that machine load
    cannot bias, unlike step times of runs made at different times. A method at its own learning rate
    costs what the method costs."""
    import time

    import torch

    built = {}
    for method in METHODS:
        torch.manual_seed(0)
        model, hook = M.build(method, context, 0)
        model.train()
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
        built[method] = (model, hook, optimizer)
    batches = iter(context.epoch(torch.Generator().manual_seed(0)))
    batch = next(batches)
    times: dict[str, list[float]] = {method: [] for method in METHODS}
    for round_ in range(warmup + rounds):
        for method, (model, hook, optimizer) in built.items():
            start = time.perf_counter()
            model(**batch).loss.backward()
            optimizer.step()
            if hook is not None:
                hook(round_)
            optimizer.zero_grad(set_to_none=True)
            if round_ >= warmup:
                times[method].append(time.perf_counter() - start)
    return {method: float(np.median(values)) for method, values in times.items()}


def _step_seconds(task_notes: dict, method: str) -> float | None:
    return task_notes.get("step_seconds_side_by_side", {}).get(method.removesuffix(M.OWN_LR))


def _values(results, method: str, step: int, metric: str) -> np.ndarray:
    runs = sorted((r for r in results if r.method == method), key=lambda r: r.seed)
    return np.array([r.curve[step][metric] for r in runs])


def contrasts(task_results: dict) -> list[dict]:
    """The named contrasts on every task: {task: (results, metric, higher)} -> rows with Holm p-values."""
    rows = []
    for task, (results, metric, higher) in task_results.items():
        steps = sorted(next(iter(results)).curve)
        present = {r.method for r in results}
        for name, method, baseline, which in CONTRASTS:
            if not {method, baseline} <= present:
                continue
            step = steps[0] if which == "first" else steps[-1]
            difference = paired_difference(
                _values(results, method, step, metric), _values(results, baseline, step, metric), higher
            )
            rows.append({"task": task, "contrast": name, "method": method, "baseline": baseline, "step": step,
                         "metric": metric, **difference})  # fmt: skip
    adjusted = holm({f"{r['task']}/{r['contrast']}": r["p"] for r in rows})
    for row in rows:
        row["p_holm"] = adjusted[f"{row['task']}/{row['contrast']}"]
    return rows


def table(summary_rows: list[dict], contrast_rows: list[dict], notes: dict) -> str:
    """Markdown: per task, each method's parameters, metric at every checkpoint, its step time measured side
    by side (and as a multiple of LoRA's), then the named contrasts."""
    lines = []
    for task in dict.fromkeys(r["task"] for r in summary_rows):
        subset = [r for r in summary_rows if r["task"] == task and r["method"] in NLU_METHODS]
        steps = list(subset[0]["curve"])
        metric = subset[0]["metric"]
        header = " | ".join(f"step {s}" for s in steps)
        lora_s = _step_seconds(notes.get(task, {}), "lora")
        lines += [f"\n### {task}: {metric} (mean over seeds) at each checkpoint\n",
                  f"| method | optimised params | of which hypernetwork | final adapter params | {header} "
                  "| s/step side by side (x LoRA) |",
                  "|---|---|---|---|" + "---|" * len(steps) + "---|"]  # fmt: skip
        for r in subset:
            cells = " | ".join(f"{r['curve'][s]:.4g}" for s in steps)
            step_s = _step_seconds(notes.get(task, {}), r["method"])
            timing = "" if step_s is None else f"{step_s:.3f} ({step_s / lora_s:.2f}x)"
            lines.append(f"| {r['method']} | {r['trainable_params']:,} | {r.get('hypernetwork_params') or 0:,} "
                         f"| {_count(r.get('adapter_params'))} | {cells} | {timing} |")  # fmt: skip
    lines += ["\n| task | contrast | difference (better > 0) [95 % CI] | p | Holm p |", "|---|---|---|---|---|"]
    for c in contrast_rows:
        lines.append(f"| {c['task']} | {c['contrast']}: {c['method']} - {c['baseline']} at step {c['step']} "
                     f"| {c['improvement']:+.4f} [{c['ci_low']:+.4f}, {c['ci_high']:+.4f}] | {c['p']:.2g} "
                     f"| {c['p_holm']:.2g} |")  # fmt: skip
    return "\n".join(lines)


def _count(value) -> str:
    return "" if value is None else f"{value:,}"


def plot_convergence(summary_rows: list[dict], path: Path, notes: dict) -> None:
    """Per task: mean metric against training step (top) and against training seconds (bottom: the step
    times the methods took side by side, times the step)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    tasks = list(dict.fromkeys(r["task"] for r in summary_rows))
    figure = Figure(figsize=(5.5 * len(tasks), 7.0), constrained_layout=True)
    FigureCanvasAgg(figure)
    axes = figure.subplots(2, len(tasks), squeeze=False)
    for column, task in enumerate(tasks):
        for r in (r for r in summary_rows if r["task"] == task and r["method"] in NLU_METHODS):
            steps = [int(s) for s in r["curve"]]
            values = list(r["curve"].values())
            axes[0][column].plot(steps, values, marker="o", label=r["method"])
            step_s = _step_seconds(notes.get(task, {}), r["method"])
            if step_s is not None:
                axes[1][column].plot([s * step_s for s in steps], values, marker="o", label=r["method"])
        for row, label in ((0, "training step"), (1, "training seconds (step x its side-by-side step time)")):
            axes[row][column].set_xlabel(label)
            axes[row][column].set_ylabel(f"mean {r['metric']}")
            axes[row][column].legend(fontsize=8)
        axes[0][column].set_title(f"{task}: {r['metric']} ({'higher' if r['metric'] == 'accuracy' else 'lower'} "
                                  "is better)", fontsize=10)  # fmt: skip
    write_with_atomic(path, lambda tmp: figure.savefig(tmp, format="png", dpi=110))
