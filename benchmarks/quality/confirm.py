"""Confirmation runs in the regime where an allocation can show: heterogeneous ranks against uniform LoRA.

    python -m benchmarks.quality.confirm                       # the CPU configuration
    python -m benchmarks.quality.confirm --seeds 8             # more paired seeds (resumes the log)
    python -m benchmarks.quality.confirm --smoke               # seconds: checks the harness

The decoder task that passed the regime check (``regime.py``: SmolLM2-135M on BBC text, 120 steps at
1e-3), every allocation trained with rsLoRA scaling (``alpha / sqrt(r)``, equal to uniform LoRA's scale at
the average rank), so a high-rank matrix does not take larger first steps than the rest. Uniform LoRA is
the regime check's r = 8 arm (the same seeds, data order and scale: its runs are read from the regime log
and extended there). Each run logs every matrix's ``||Delta W||_F`` at the end.

Named before the run (CANDIDATES, CONTRASTS): each candidate against uniform LoRA on held-out NLL (paired by
seed, improvement = NLL(uniform) - NLL(candidate)); the paper's allocation against its shuffled control (does
theta know more than the shape of its rank distribution?) and against itself with alpha / r scaling (does
rsLoRA change it?); Holm over the family. Candidates: the paper's allocation with rsLoRA (the issue's first
rerun) and with the plain alpha / r scaling the comparison used, its shuffled control with rsLoRA, the
default (rank aggregation) with rsLoRA, and ``hessian-robust`` with rsLoRA, the rule the teacher screen
(``screen.py``) scored best on this task. 2 seeds in the CPU configuration (what one session afforded beside
the screen); ``--seeds 8`` extends every arm from the logs.
"""

from __future__ import annotations

import copy
import dataclasses
import sys
import time

import numpy as np
import sensilora
import torch

from benchmarks.common import environment, write_results
from benchmarks.quality import methods as M
from benchmarks.quality import regime
from benchmarks.quality import rules as R
from benchmarks.quality.options import parse
from benchmarks.quality.paired import holm, paired_difference
from benchmarks.quality.run_quality import RunLog, run_methods

BASELINE = f"lora-rs r={regime.HIGH}"
RSLORA = "-rs"  # a candidate whose name ends so trains with rsLoRA scaling; the others with alpha / r
CANDIDATES = ("paper-rs", "shuffled-rs", "rank-rs", "paper", "robust-rs")
CONTRASTS = [(c, BASELINE) for c in CANDIDATES] + [("paper-rs", "shuffled-rs"), ("paper-rs", "paper")]
CONFIGS = {"cpu": {**regime.CONFIGS["cpu"], "seeds": 2}, "smoke": {**regime.CONFIGS["smoke"], "seeds": 2}}
LABEL = regime.TASKS["nlg"][0]


def candidate_allocations(context: M.TaskContext, calibration) -> dict:
    """Each candidate's RankAllocation (the shuffled control's: the paper's, permuted per seed by ``build``),
    its scaling recorded in its config."""
    variant = {c: c.removesuffix(RSLORA).replace("shuffled", "paper") for c in CANDIDATES}
    M.prepare(context, sorted(set(variant.values())), calibration, calibration)
    return {
        c: dataclasses.replace(a, config=a.config.replace(use_rslora=c.endswith(RSLORA)))
        for c, a in ((c, context.allocations[v]) for c, v in variant.items())
    }


def build(setup, context, allocations):
    def make(method: str, _context, seed: int):
        if method == BASELINE:
            return regime.uniform_rslora(setup, regime.HIGH, context.avg_rank), None
        allocation = allocations[method]
        if method.startswith("shuffled"):
            allocation = M.shuffled_allocation(allocation, seed)
        model = sensilora.get_peft_model(
            copy.deepcopy(context.base), allocation, lora_alpha=2 * context.avg_rank, task_type=context.task_type
        )
        return model, None

    return make


def summarise(results) -> tuple[list[dict], list[dict]]:
    by_method = {}
    for result in results:
        by_method.setdefault(result.method, {})[result.seed] = result
    seeds = sorted(set.intersection(*(set(runs) for runs in by_method.values())))
    nll = {m: np.array([by_method[m][s].metrics["nll"] for s in seeds]) for m in by_method}
    rows = []
    for method, runs in by_method.items():
        norms = [runs[s].update_norms for s in seeds if runs[s].update_norms]
        by_type = {}
        for name in norms[0] if norms else {}:
            by_type.setdefault(R.depth_and_type(name)[1], []).append(np.mean([n[name] for n in norms]))
        rows.append({"method": method, "seeds": len(seeds), "nll_mean": float(nll[method].mean()),
                     "nll_std": float(nll[method].std(ddof=1)) if len(seeds) > 1 else 0.0,
                     "perplexity_mean": float(np.mean([runs[s].metrics["perplexity"] for s in seeds])),
                     "trainable_params": runs[seeds[0]].trainable_parameters,
                     "update_norm_by_type": {k: float(np.mean(v)) for k, v in by_type.items()}})  # fmt: skip
    contrasts = []
    for method, baseline in CONTRASTS:
        if method in nll and baseline in nll:
            contrasts.append({"contrast": f"{method} vs {baseline}", "n": len(seeds),
                              **paired_difference(nll[method], nll[baseline], higher_is_better=False)})  # fmt: skip
    adjusted = holm({c["contrast"]: c["p"] for c in contrasts if np.isfinite(c["p"])})
    for c in contrasts:
        c["p_holm"] = adjusted.get(c["contrast"], float("nan"))
    return rows, contrasts


def main(argv=None) -> int:
    args = parse(__doc__, argv, seeds_help="paired seeds (default: the configuration's)")
    name = "smoke" if args.smoke else "cpu"
    config = {**CONFIGS[name], **({"seeds": args.seeds} if args.seeds else {})}
    device = torch.device("cpu")
    started = time.perf_counter()
    setup = regime.TASKS["nlg"][1](config, device)
    avg = config["nlg_avg_rank"]
    context = M.TaskContext(setup.base, setup.targets, avg, setup.task_type, config["nlg_steps"], epoch=setup.epoch)
    allocations = candidate_allocations(context, setup.calibration)
    context.allocations = allocations  # the run log's fingerprints: the ranks each candidate trains with
    smoke = args.smoke
    baseline_log = RunLog(None if smoke else args.results / "regime_cpu.runs.jsonl")
    log = RunLog(None if smoke else args.results / f"confirm_{name}.runs.jsonl")
    common = (config["seeds"], setup.epoch, config["nlg_lr"], setup.evaluators["test"], config["nlg_checkpoints"])
    make = build(setup, context, allocations)
    results = run_methods(context, [BASELINE], *common, LABEL, baseline_log, build=make)
    results += run_methods(context, list(CANDIDATES), *common, LABEL, log, build=make)
    rows, contrasts = summarise(results)
    env = {**environment(device), "config": name, "settings": config, "baseline": BASELINE,
           "candidates": list(CANDIDATES), "contrasts": contrasts, "seconds": round(time.perf_counter() - started, 1),
           "max_rank": {m: max(a.ranks.values()) for m, a in allocations.items()}}  # fmt: skip
    write_results(f"confirm_{name}", env, rows, args.results)
    for c in contrasts:
        print(f"{c['contrast']}: {c['improvement']:+.4f} [{c['ci_low']:+.4f}, {c['ci_high']:+.4f}] "
              f"p {c['p']:.3g} Holm {c['p_holm']:.3g} (n={c['n']})")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
