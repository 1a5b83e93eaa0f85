"""Does Sensitivity-LoRA beat uniform LoRA (and EVA) at the same trainable parameters? A paired evaluation.

    python -m benchmarks.quality.run_quality            # the CPU configuration (about 2.5 h on 2 cores from scratch)
    python -m benchmarks.quality.run_quality --gpu      # a larger configuration for a GPU
    python -m benchmarks.quality.run_quality --smoke    # seconds: checks the harness (used by the tests)
    python -m benchmarks.quality.run_quality --compare hyperadalora   # issue 15's comparison (hyper_compare)

Tasks. NLU: MiniLM-L6 classifies KJV verses by the genre of their book (8 classes; fixed stratified
train/dev/test), avg rank 4, accuracy on test; the learning rate is chosen once, for uniform LoRA, on dev
(seed 0), then fixed for every method. NLG: SmolLM2-135M on BBC News text, avg rank 8, held-out perplexity
at several points of the run. Statistics are calibrated on each task's own training split.

Protocol. Every method trains with the same seeds and, per seed, the same data order and head
initialisation; each seed gives one paired difference to uniform LoRA (95 % t interval, paired t-test).
Warm-up (10 %) then linear decay. Sensitivity-LoRA variants spend uniform LoRA's parameter budget.

Named before the run. Primary contrasts: each candidate in PRIMARY vs uniform LoRA on each task it runs
on, Holm-corrected over that whole family. Decision rule for the library default (DEFAULT_RULE): a
candidate qualifies if it improves on uniform LoRA with Holm-adjusted p < 0.05 on at least one task and
its 95 % interval lies not wholly below zero on any task; among those, the largest sum over tasks of the
improvement divided by uniform LoRA's seed standard deviation wins. If none qualifies, the default is still
never a candidate significantly worse than uniform LoRA on any task: the safe candidates (interval not wholly
below zero on any task) are ranked by the same sum and the best ships, and the README says that nothing
beat uniform LoRA; if none is safe, uniform ranks ship (temperature 0). (This fallback replaced "the paper's
method stays the default" after the 2026-12 CPU suite had run, by issue 22.) Secondary (descriptive): EVA, EVA's
ranks with standard initialisation, the shuffled control, obs mode, AdaLoRA.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from benchmarks.common import RESULTS, environment, write_results
from benchmarks.quality import hyper_compare
from benchmarks.quality import methods as M
from benchmarks.quality.paired import holm, paired_difference
from benchmarks.quality.report import plot, report
from benchmarks.quality.setups import nlg_setup, nlu_setup
from benchmarks.quality.train import RunResult, train, update_norms

# "robust" (the Hessian diagonal without outlier tokens) joined the family on 2026-12-04, before any run of it
PRIMARY = ("paper", "rank", "tempered", "sink-excluded", "fisher", "robust")
DEFAULT_RULE = (
    "Holm p < 0.05 win on >= 1 task, no task with its interval wholly below 0; largest standardised win; "
    "else the safe candidate (no task wholly below 0) with the largest standardised sum; else uniform ranks"
)
CONFIGS = {
    "cpu": {
        "seeds": 5, "nlu_train": 120, "nlu_dev": 40, "nlu_test": 100, "nlu_len": 48, "nlu_batch": 16,
        "nlu_steps": 120, "nlu_lrs": (5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2), "nlu_lrs_own": (2e-3, 5e-3, 1e-2, 2e-2),
        "nlu_checkpoints": (40, 80, 120),
        "nlu_methods": M.ALL_METHODS, "nlg_docs": 300, "nlg_len": 64, "nlg_batch": 4, "nlg_steps": 30,
        "nlg_lr": 1e-3, "nlg_eval_windows": 24, "nlg_checkpoints": (10, 20, 30),
        "nlg_methods": M.ALL_METHODS, "calibration_samples": 32,
    },
    "smoke": {
        "seeds": 2, "nlu_train": 3, "nlu_dev": 2, "nlu_test": 2, "nlu_len": 16, "nlu_batch": 4, "nlu_steps": 4,
        "nlu_lrs": (1e-3,), "nlu_lrs_own": (1e-3, 1e-2), "nlu_checkpoints": (2, 4), "nlu_methods": M.ALL_METHODS,
        "nlg_docs": 8,
        "nlg_len": 16, "nlg_batch": 2, "nlg_steps": 2, "nlg_lr": 1e-3, "nlg_eval_windows": 2,
        "nlg_checkpoints": (2,), "nlg_methods": ("lora", "paper", "fisher", "shuffled"), "calibration_samples": 4,
    },
    "gpu": {
        "seeds": 5, "nlu_train": 600, "nlu_dev": 100, "nlu_test": 300, "nlu_len": 64, "nlu_batch": 32,
        "nlu_steps": 1200, "nlu_lrs": (2e-4, 5e-4, 1e-3, 2e-3), "nlu_lrs_own": (1e-3, 2e-3, 5e-3, 1e-2),
        "nlu_checkpoints": (300, 600, 900, 1200),
        "nlu_methods": M.ALL_METHODS, "nlg_docs": 1780, "nlg_len": 256, "nlg_batch": 16, "nlg_steps": 600,
        "nlg_lr": 5e-4, "nlg_eval_windows": 256, "nlg_checkpoints": (150, 300, 450, 600),
        "nlg_methods": M.ALL_METHODS, "calibration_samples": 128,
    },
}  # fmt: skip


class RunLog:
    """Every finished run appended to a JSONL file as it ends; a later invocation resumes from it (runs
    already there are read back, not repeated), so a long evaluation survives interruption. A run is known
    by (label, method, seed, learning rate, steps, fingerprint of the ranks it trained with): a changed
    rate, length or allocation is a new run, never a stale one (a run's steps: its last checkpoint). Records
    from before fingerprints were kept carry none (LEGACY) and are reused only where the caller vouches the
    allocation did not change."""

    LEGACY = "legacy"

    def __init__(self, path: Path | None):
        self.path = path
        self.done = {}
        if path is not None and path.exists():
            for line in path.read_text(encoding="utf-8").splitlines():
                record = json.loads(line)
                record["curve"] = {int(k): v for k, v in record["curve"].items()}
                label, lr = record.pop("label"), record.pop("lr")
                fingerprint = record.pop("allocation_sha256", self.LEGACY)
                result = RunResult(**record)
                self.done[(label, result.method, result.seed, lr, max(result.curve), fingerprint)] = result

    def get(
        self,
        label: str,
        method: str,
        seed: int,
        lr: float,
        steps: int,
        fingerprint: str | None = None,
        legacy_ok: bool = True,
    ) -> RunResult | None:
        """The logged run, if any; a LEGACY record stands in when ``legacy_ok`` (always for fingerprint
        None: such a method's adapter does not come from an allocation)."""
        found = self.done.get((label, method, seed, lr, steps, fingerprint))
        if found is None and (legacy_ok or fingerprint is None):
            found = self.done.get((label, method, seed, lr, steps, self.LEGACY))
        return found

    def add(self, label: str, lr: float, result: RunResult, fingerprint: str | None = None) -> None:
        self.done[(label, result.method, result.seed, lr, max(result.curve), fingerprint)] = result
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            record = {"label": label, "lr": lr, "allocation_sha256": fingerprint, **dataclasses.asdict(result)}
            with self.path.open("a", encoding="utf-8") as handle:
                handle.write(json.dumps(record) + "\n")


def run_methods(
    context, methods, seeds, epoch, lr, evaluate, checkpoints, label, log: RunLog, build=M.build
) -> list[RunResult]:
    """Every (seed, method) run, resumed from ``log``; ``build(method, context, seed)`` gives a fresh
    (peft model, per-step hook or None) for a method (default: the comparison's methods)."""
    if max(checkpoints) != context.steps:  # the log knows a run's length by its last checkpoint
        last = max(checkpoints)
        raise SystemExit(f"{label}: the last checkpoint {last} is not the run's {context.steps} steps; end them there")
    results = []
    for seed, method in tqdm([(s, m) for s in range(seeds) for m in methods], desc=label):
        fingerprint = M.allocation_fingerprint(context, method)
        legacy_ok = M.unchanged_by_the_rank_bound(context, method)
        done = log.get(label, method, seed, lr, context.steps, fingerprint, legacy_ok=legacy_ok)
        if done is not None:
            if not done.parameters:  # logged before counts were recorded: a fixed-rank method's are seed-free
                done.parameters = M.parameter_counts(build(method, context, seed)[0])
            results.append(done)
            continue
        torch.manual_seed(seed)  # same head initialisation and dropout stream for every method of a seed
        if hasattr(context.base, "classifier"):
            context.base.classifier.reset_parameters()
        model, hook = build(method, context, seed)
        step_s, peak, curve = train(model, epoch, context.steps, lr, seed, hook, evaluate(model), checkpoints,
                                    loss_fn=context.loss)  # fmt: skip
        final = curve[max(curve)]
        counts = M.parameter_counts(model)
        norms = update_norms(model)
        results.append(RunResult(method, seed, final, M.trainable(model), step_s, peak, curve, counts, norms))
        log.add(label, lr, results[-1], fingerprint)
    return results


def nlu_task(config, device, log):
    setup = nlu_setup(config, device)
    epoch, accuracy_on = setup.epoch, setup.evaluators
    context = M.TaskContext(setup.base, setup.targets, 4, setup.task_type, config["nlu_steps"], epoch=epoch)
    M.prepare(context, config["nlu_methods"], setup.calibration, setup.calibration)

    def best_lr(method: str, grid) -> tuple[float, dict]:  # on dev, seed 0: highest accuracy, then smallest lr
        search = {}
        for value in grid:
            label = f"NLU lr {value}" + ("" if method == "lora" else f" {method}")
            dev = run_methods(
                context, [method], 1, epoch, value, accuracy_on["dev"], (config["nlu_steps"],), label, log
            )
            search[value] = dev[0].metrics["accuracy"]
        return max(search, key=lambda value: (search[value], -value)), search

    lr, lr_search = best_lr("lora", config["nlu_lrs"])
    own = {
        m: best_lr(m.removesuffix(M.OWN_LR), config["nlu_lrs_own"])
        for m in config["nlu_methods"]
        if m.endswith(M.OWN_LR)
    }
    results = []
    for group_lr, group in [(lr, [m for m in config["nlu_methods"] if m not in own])] + [(own[m][0], [m]) for m in own]:
        results += run_methods(context, group, config["seeds"], epoch, group_lr, accuracy_on["test"],
                               config["nlu_checkpoints"], "NLU runs (MiniLM-L6, KJV genres)", log)  # fmt: skip
    notes = {"lr_search_dev_accuracy": lr_search, "lr": lr}
    notes.update({f"{m} lr_search_dev_accuracy": search for m, (_, search) in own.items()})
    return results, context, {**notes, **{f"{m} lr": chosen for m, (chosen, _) in own.items()}}


def nlg_task(config, device, log):
    setup = nlg_setup(config, device)
    context = M.TaskContext(setup.base, setup.targets, 8, setup.task_type, config["nlg_steps"], epoch=setup.epoch)
    M.prepare(context, config["nlg_methods"], setup.calibration, setup.calibration)
    results = run_methods(context, config["nlg_methods"], config["seeds"], setup.epoch, config["nlg_lr"],
                          setup.evaluators["test"], config["nlg_checkpoints"], "NLG runs (SmolLM2-135M, BBC text)",
                          log)  # fmt: skip
    return results, context, {"lr": config["nlg_lr"]}


TASKS = {"nlu": ("NLU", nlu_task, "accuracy", True), "nlg": ("NLG", nlg_task, "perplexity", False)}


def summarise(task: str, metric: str, higher: bool, results: list[RunResult], context) -> list[dict]:
    """One row per method: mean, seed std, paired improvement over uniform LoRA with interval and p."""
    baseline = np.array([r.metrics[metric] for r in sorted(results, key=lambda r: r.seed) if r.method == "lora"])
    rows = []
    for method in dict.fromkeys(r.method for r in results):
        runs = sorted((r for r in results if r.method == method), key=lambda r: r.seed)
        values = np.array([r.metrics[metric] for r in runs])
        allocation = M.allocated(context, method)
        row = {
            "task": task, "method": method, "metric": metric, "seeds": len(runs),
            "trainable_params": runs[0].trainable_parameters, "mean": float(values.mean()),
            "adapter_params": runs[0].parameters.get("adapter"),
            "hypernetwork_params": runs[0].parameters.get("hypernetwork"),
            "std": float(values.std(ddof=1)) if len(values) > 1 else 0.0,
            **{f"vs_lora_{k}": v for k, v in paired_difference(values, baseline, higher).items() if k != "n"},
            "max_rank": max(allocation.ranks.values()) if allocation else None,
            "calibration_s": context.calibration_seconds.get(method, context.eva_seconds if "eva" in method else None),
            "step_s": float(np.mean([r.step_seconds for r in runs])),
            "curve": {str(step): float(np.mean([r.curve[step][metric] for r in runs])) for step in runs[0].curve},
            "curve_seconds": {str(s): float(np.mean([r.curve[s]["seconds"] for r in runs])) for s in runs[0].curve},
        }  # fmt: skip
        rows.append(row)
    return rows


def decide(rows: list[dict]) -> dict:
    """Holm over the primary family, then DEFAULT_RULE."""
    family = {(r["task"], r["method"]): r["vs_lora_p"] for r in rows if r["method"] in PRIMARY}
    adjusted = holm({f"{t}/{m}": p for (t, m), p in family.items()})
    for r in rows:
        r["vs_lora_p_holm"] = adjusted.get(f"{r['task']}/{r['method']}")
    lora_std = {r["task"]: r["std"] for r in rows if r["method"] == "lora"}
    qualified, safe = {}, {}
    for method in PRIMARY:
        mine = [r for r in rows if r["method"] == method]
        wins = any(r["vs_lora_improvement"] > 0 and r["vs_lora_p_holm"] < 0.05 for r in mine)
        loses = any(r["vs_lora_ci_high"] < 0 for r in mine)
        score = sum(r["vs_lora_improvement"] / max(lora_std[r["task"]], 1e-12) for r in mine)
        if mine and not loses:
            safe[method] = score
            if wins:
                qualified[method] = score
    winner = max(qualified, key=qualified.get) if qualified else None
    fallback = max(safe, key=safe.get) if safe else "uniform ranks"
    return {
        "rule": DEFAULT_RULE,
        "qualified": qualified,
        "safe": safe,
        "default": winner or fallback,
        "beats_lora": winner is not None,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpu", action="store_true", help="the larger GPU configuration")
    parser.add_argument("--smoke", action="store_true", help="a seconds-long run that only checks the harness")
    parser.add_argument("--tasks", nargs="+", choices=list(TASKS), default=list(TASKS))
    parser.add_argument("--compare", choices=["hyperadalora"],
                        help="only the methods of a named comparison, with its own contrasts and plot")  # fmt: skip
    parser.add_argument("--results", type=Path, default=RESULTS, help="output folder (default benchmarks/results)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    name = "gpu" if args.gpu else "smoke" if args.smoke else "cpu"
    config = CONFIGS[name]
    if args.compare:
        config = {**config, "nlu_methods": hyper_compare.NLU_METHODS, "nlg_methods": hyper_compare.METHODS}
    device = torch.device("cuda" if args.gpu else "cpu")
    started = time.perf_counter()
    log = RunLog(None if args.smoke else args.results / f"quality_{name}.runs.jsonl")
    rows, notes, raw = [], {}, {}
    for key in args.tasks:
        task, run, metric, higher = TASKS[key]
        results, context, task_notes = run(config, device, log)
        rows += summarise(task, metric, higher, results, context)
        notes[task], raw[task] = task_notes, (results, metric, higher)
        if args.compare:  # step times of the methods measured side by side, in this process, interleaved
            lr = task_notes["lr"]
            notes[task]["step_seconds_side_by_side"] = hyper_compare.side_by_side_step_seconds(context, lr)
    env = {**environment(device), "config": name, "minutes": round((time.perf_counter() - started) / 60, 1)}
    env.update({"notes": notes, "settings": config})
    if args.compare:
        stem = f"quality_{name}_{args.compare}"
        env["contrasts"] = hyper_compare.contrasts(raw)
        write_results(stem, env, rows, args.results)
        hyper_compare.plot_convergence(rows, args.results / f"{stem}.png", notes)
        print(hyper_compare.table(rows, env["contrasts"], notes))
        return 0
    decision = decide(rows)
    env.update({"decision": decision, "primary": list(PRIMARY)})
    stem = f"quality_{name}"
    write_results(stem, env, rows, args.results)
    plot(rows, args.results / f"{stem}.png")
    print(report(rows, decision))
    return 0


if __name__ == "__main__":
    sys.exit(main())
