"""Can an allocation matter here at all? The regime check that comes before any comparison of allocations.

    python -m benchmarks.quality.regime                 # the CPU configuration (cost per task in the results)
    python -m benchmarks.quality.regime --tasks nlu     # one task
    python -m benchmarks.quality.regime --smoke         # seconds: checks the harness (used by the tests)

Uniform LoRA with rsLoRA scaling (``alpha / sqrt(r)``, one alpha for every rank, so the step size does not
change with the rank) at r = 1, 2, 4, 8, 16, with the same seeds, data order and head initialisation per
seed at every rank, trained at one stable learning rate per task (a grid step below the best rate the
method comparison found, which is itself a step below divergence). Scored by held-out NLL (lower is better;
accuracy and perplexity are recorded beside it); the distillation task by held-out KL(teacher || student).

Named before the run. A task is in the regime where an allocation can show (PASS) when capacity matters:
the paired gain of r = 8 over r = 1 (per seed, NLL(r=1) - NLL(r=8)) is positive and at least PASS_RATIO
times the standard deviation of those paired differences (a paired t statistic of PASS_RATIO * sqrt(n)).
(On the distillation tasks the same contrast on the held-out KL, or on the encoder's held-out squared
distance to the teacher's hidden states.) Below that, heterogeneous ranks cannot be told apart from uniform
LoRA with the seeds we can afford, and a method comparison on that task says nothing about allocation.
Every run is logged as it ends (``regime_<config>.runs.jsonl``): a later invocation resumes, so the check can
span sessions.
"""

from __future__ import annotations

import copy
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import environment, write_results
from benchmarks.quality import methods as M
from benchmarks.quality.options import parse
from benchmarks.quality.paired import paired_difference
from benchmarks.quality.run_quality import RunLog, run_methods
from benchmarks.quality.setups import (
    bbc_distill_setup,
    distill_setup,
    encoder_distill_setup,
    kjv_setup,
    nlg_setup,
    nlu_setup,
)
from benchmarks.quality.train import RunResult

RANKS = (1, 2, 4, 8, 16)
METHODS = {f"lora-rs r={rank}": rank for rank in RANKS}  # the run log's method names
LOW, HIGH = 1, 8  # the contrast named before the run
PASS_RATIO = 3.0  # gain / paired spread at which a task passes
CONFIGS = {
    "cpu": {
        # NLG: 2 seeds fit one session (about 1.5 s a step on 2 cores); --seeds 5 extends both from the log
        "nlu_seeds": 5, "nlg_seeds": 2, "nlu_train": 120, "nlu_dev": 40, "nlu_test": 100, "nlu_len": 48,
        "nlu_batch": 16,
        "nlu_steps": 360, "nlu_lr": 2e-3, "nlu_checkpoints": (120, 240, 360), "nlu_avg_rank": 4,
        "nlg_docs": 300, "nlg_len": 64, "nlg_batch": 4, "nlg_steps": 120, "nlg_lr": 1e-3, "nlg_eval_windows": 24,
        "nlg_checkpoints": (40, 80, 120), "nlg_avg_rank": 8, "calibration_samples": 32,
        # KJV text (a second domain): the NLG settings; 3 seeds (about 1.3 s a step)
        "kjv_seeds": 3, "kjv_steps": 120, "kjv_lr": 1e-3, "kjv_checkpoints": (40, 80, 120), "kjv_avg_rank": 8,
        # distillation: a teacher fully fine-tuned on KJV text (120 steps at 1e-4, about 4 min); students at a
        # low average rank learn its distributions on 80 training batches, one pass
        "distill_seeds": 3, "distill_steps": 80, "distill_lr": 1e-3, "distill_checkpoints": (40, 80),
        "distill_avg_rank": 2, "distill_teacher_steps": 120, "distill_teacher_lr": 1e-4, "distill_windows": 80,
        "distill_cache": True,
        "distill_dev_windows": 24,  # the dev split (windows of training documents no model trains on)
        # the same distillation on BBC text (a second domain; added on 2026-12-07 before its runs)
        "bbc_distill_seeds": 3, "bbc_distill_steps": 80, "bbc_distill_lr": 1e-3, "bbc_distill_checkpoints": (40, 80),
        "bbc_distill_avg_rank": 2, "bbc_distill_teacher_steps": 120, "bbc_distill_teacher_lr": 1e-4,
        "bbc_distill_windows": 80, "bbc_distill_cache": True, "bbc_distill_dev_windows": 24,
        # encoder distillation: a teacher fully fine-tuned on the NLU task (360 steps at 1e-4, about 2.5 min);
        # students at a low average rank learn its last hidden states on the NLU training verses, 4 epochs
        "enc_distill_seeds": 3, "enc_distill_steps": 240, "enc_distill_lr": 1e-3,
        "enc_distill_checkpoints": (80, 160, 240),
        "enc_distill_avg_rank": 2, "enc_distill_teacher_steps": 360, "enc_distill_teacher_lr": 1e-4,
        "enc_distill_cache": True,
        # the same, trained 4x longer (16 epochs), near its plateau: at 240 steps the distance still falls fast
        "enc_distill_long_seeds": 3, "enc_distill_long_steps": 960, "enc_distill_long_lr": 1e-3,
        "enc_distill_long_checkpoints": (240, 480, 720, 960), "enc_distill_long_avg_rank": 2,
    },
    "smoke": {
        "nlu_seeds": 2, "nlg_seeds": 2, "nlu_train": 3, "nlu_dev": 2, "nlu_test": 2, "nlu_len": 16, "nlu_batch": 4,
        "nlu_steps": 3,
        "nlu_lr": 1e-3, "nlu_checkpoints": (3,), "nlu_avg_rank": 4, "nlg_docs": 8, "nlg_len": 16, "nlg_batch": 2,
        "nlg_steps": 2, "nlg_lr": 1e-3, "nlg_eval_windows": 2, "nlg_checkpoints": (2,), "nlg_avg_rank": 8,
        "calibration_samples": 4, "kjv_seeds": 2, "kjv_steps": 2, "kjv_lr": 1e-3, "kjv_checkpoints": (2,),
        "kjv_avg_rank": 8, "distill_seeds": 2, "distill_steps": 2, "distill_lr": 1e-3, "distill_checkpoints": (2,),
        "distill_avg_rank": 2, "distill_teacher_steps": 2, "distill_teacher_lr": 1e-4, "distill_windows": 2,
        "distill_dev_windows": 2, "bbc_distill_dev_windows": 2,
        "bbc_distill_seeds": 2, "bbc_distill_steps": 2, "bbc_distill_lr": 1e-3, "bbc_distill_checkpoints": (2,),
        "bbc_distill_avg_rank": 2, "bbc_distill_teacher_steps": 2, "bbc_distill_teacher_lr": 1e-4,
        "bbc_distill_windows": 2,
        "enc_distill_seeds": 2, "enc_distill_steps": 2, "enc_distill_lr": 1e-3, "enc_distill_checkpoints": (2,),
        "enc_distill_avg_rank": 2, "enc_distill_teacher_steps": 2, "enc_distill_teacher_lr": 1e-4,
        "enc_distill_long_seeds": 2, "enc_distill_long_steps": 4, "enc_distill_long_lr": 1e-3,
        "enc_distill_long_checkpoints": (2, 4), "enc_distill_long_avg_rank": 2,
    },
}  # fmt: skip
TASKS = {
    "nlu": ("NLU (MiniLM-L6, KJV genres)", nlu_setup),
    "nlg": ("NLG (SmolLM2-135M, BBC text)", nlg_setup),
    "kjv": ("NLG (SmolLM2-135M, KJV text)", kjv_setup),
    "distill": ("Distillation (SmolLM2-135M, KJV teacher)", distill_setup),
    "bbc_distill": ("Distillation (SmolLM2-135M, BBC teacher)", bbc_distill_setup),
    "enc_distill": ("Distillation (MiniLM-L6, genre teacher)", encoder_distill_setup),
    "enc_distill_long": ("Distillation (MiniLM-L6, genre teacher, 960 steps)", encoder_distill_setup),
}


def uniform_rslora(setup, rank: int, avg_rank: int, ranks: dict[str, int] | None = None):
    """A fresh copy of the base model with uniform LoRA of ``rank``, rsLoRA scaling; alpha is chosen so
    that at ``avg_rank`` the scale equals plain LoRA's alpha / r = 2 (the method comparison's). ``ranks``
    ({module name: rank}, e.g. EVA's) replace ``rank`` per module, with the same alpha; a module of rank 0
    is left without an adapter."""
    import peft

    targets, rank_pattern = M.adapted_targets(setup.targets, ranks or {})
    config = peft.LoraConfig(r=rank, lora_alpha=2 * math.sqrt(avg_rank), use_rslora=True,
                             target_modules=targets, task_type=setup.task_type, rank_pattern=rank_pattern)  # fmt: skip
    return peft.get_peft_model(copy.deepcopy(setup.base), config)


METRIC_LABELS = {"nll": "NLL", "kl": "KL", "distance": "squared distance"}  # axis labels of the primary metrics


def task_context(key: str, setup, config: dict) -> M.TaskContext:
    """What every run of task ``key`` shares: its setup's model, targets, loss and data order, the task's
    average rank of interest and step count from ``config``."""
    return M.TaskContext(setup.base, setup.targets, config[f"{key}_avg_rank"], setup.task_type,
                         config[f"{key}_steps"], epoch=setup.epoch, loss=setup.loss)  # fmt: skip


def run_task(key: str, config: dict, device: torch.device, log: RunLog):
    """Every (seed, rank) run of one task, resumed from ``log`` (the method comparison's loop: the same head
    initialisation and dropout stream at every rank of a seed); returns (results, the task's setup, seconds
    spent here)."""
    label, make = TASKS[key]
    started = time.perf_counter()
    setup = make(config, device)
    context = task_context(key, setup, config)
    avg = context.avg_rank
    results = run_methods(
        context, list(METHODS), config[f"{key}_seeds"], setup.epoch, config[f"{key}_lr"], setup.evaluators["test"],
        config[f"{key}_checkpoints"], label, log,
        build=lambda method, _context, _seed: (uniform_rslora(setup, METHODS[method], avg), None),
    )  # fmt: skip
    return results, setup, time.perf_counter() - started


def summarise(task: str, results: list[RunResult], primary: str = "nll") -> tuple[list[dict], dict]:
    """Rows per rank (mean and seed std of each metric) and the task's verdict on the named contrast, on the
    held-out metric ``primary`` (lower is better)."""
    by_rank = {r: sorted((x for x in results if x.method == m), key=lambda x: x.seed) for m, r in METHODS.items()}
    rows = []
    for rank, runs in by_rank.items():
        row = {"task": task, "rank": rank, "seeds": len(runs), "trainable_params": runs[0].trainable_parameters,
               "step_s": float(np.mean([x.step_seconds for x in runs]))}  # fmt: skip
        for metric in runs[0].metrics:
            if metric != "seconds":
                values = np.array([x.metrics[metric] for x in runs])
                row[f"{metric}_mean"] = float(values.mean())
                row[f"{metric}_std"] = float(values.std(ddof=1)) if len(values) > 1 else 0.0
        rows.append(row)
    low = np.array([x.metrics[primary] for x in by_rank[LOW]])
    high = np.array([x.metrics[primary] for x in by_rank[HIGH]])
    return rows, verdict(task, low, high, primary)


def verdict(task: str, low: np.ndarray, high: np.ndarray, primary: str) -> dict:
    """The named contrast on ``primary`` (lower is better) of r = LOW (``low``, one value a seed) against
    r = HIGH (``high``, the same seeds in the same order) and whether the task passes."""
    contrast = paired_difference(high, low, higher_is_better=False)  # improvement = NLL(r=1) - NLL(r=8)
    spread = float((low - high).std(ddof=1)) if len(low) > 1 else float("nan")
    if len(low) < 2:  # one seed: no paired spread, no verdict
        ratio = float("nan")
    else:
        ratio = contrast["improvement"] / spread if spread > 0 else float("inf") * np.sign(contrast["improvement"])
    name = METRIC_LABELS.get(primary, primary)
    return {
        "task": task, "metric": primary, "contrast": f"{name}(r={LOW}) - {name}(r={HIGH})",
        "gain": contrast["improvement"],
        "ci_low": contrast["ci_low"], "ci_high": contrast["ci_high"], "p": contrast["p"], "paired_std": spread,
        "ratio": float(ratio), "seeds": len(low),
        "passes": bool(contrast["improvement"] > 0 and ratio >= PASS_RATIO),
    }  # fmt: skip


def plot(rows: list[dict], verdicts: list[dict], path: Path) -> None:
    """Held-out NLL against the rank, one panel per task, seed spread as error bars."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    tasks = list(dict.fromkeys(r["task"] for r in rows))
    figure = Figure(figsize=(5 * len(tasks), 3.6), constrained_layout=True)
    FigureCanvasAgg(figure)
    for index, task in enumerate(tasks):
        axis = figure.add_subplot(1, len(tasks), index + 1)
        mine = [r for r in rows if r["task"] == task]
        verdict = next(v for v in verdicts if v["task"] == task)
        metric = verdict.get("metric", "nll")
        axis.errorbar([r["rank"] for r in mine], [r[f"{metric}_mean"] for r in mine],
                      yerr=[r[f"{metric}_std"] for r in mine], marker="o", capsize=3)  # fmt: skip
        axis.set_xscale("log", base=2)
        axis.set_title(f"{task}\n{'PASS' if verdict['passes'] else 'fail'}: gain/spread {verdict['ratio']:.1f}",
                       fontsize=9)  # fmt: skip
        axis.set_xlabel("uniform LoRA rank (rsLoRA)")
        axis.set_ylabel(f"held-out {METRIC_LABELS.get(metric, metric)}")
    figure.savefig(path, dpi=120)


def main(argv=None) -> int:
    args = parse(__doc__, argv, TASKS, "paired seeds of every task (default: the configuration's, per task)")
    name = "smoke" if args.smoke else "cpu"
    config, device = CONFIGS[name], torch.device("cpu")
    if args.seeds:
        config = {**config, **{f"{key}_seeds": args.seeds for key in TASKS}}
    log = RunLog(None if args.smoke else args.results / f"regime_{name}.runs.jsonl")
    rows, verdicts, cost = [], [], {}
    for key in args.tasks:
        results, setup, seconds = run_task(key, config, device, log)
        task_rows, task_verdict = summarise(TASKS[key][0], results, setup.primary)
        trained = sum(x.curve[max(x.curve)]["seconds"] for x in results)
        cost[TASKS[key][0]] = {
            "seconds_this_invocation": round(seconds, 1),
            "training_seconds_logged": round(trained, 1),
            **({"setup": setup.record} if setup.record else {}),
        }
        rows += task_rows
        verdicts.append(task_verdict)
    env = {**environment(device), "config": name, "settings": config, "ranks": list(RANKS), "pass_ratio": PASS_RATIO,
           "verdicts": verdicts, "cost": cost}  # fmt: skip
    stem = f"regime_{name}"
    write_results(stem, env, rows, args.results)
    plot(rows, verdicts, args.results / f"{stem}.png")
    for v in verdicts:
        outcome = "PASS" if v["passes"] else "fail"
        print(f"{v['task']}: {v['contrast']} = {v['gain']:+.4f} [{v['ci_low']:+.4f}, {v['ci_high']:+.4f}], "
              f"paired std {v['paired_std']:.4f}, ratio {v['ratio']:.1f} -> {outcome}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
