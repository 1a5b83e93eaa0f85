"""Confirmation runs in the regime where an allocation can show: heterogeneous ranks against uniform LoRA.

    python -m benchmarks.quality.confirm                       # the CPU configuration, every passing task
    python -m benchmarks.quality.confirm --tasks distill       # one task
    python -m benchmarks.quality.confirm --seeds 8             # more paired seeds (resumes the logs)
    python -m benchmarks.quality.confirm --smoke               # seconds: checks the harness

The tasks that passed the regime check (``regime.py``): SmolLM2-135M on BBC text (120 steps at 1e-3,
average rank 8), the distillation of a fully fine-tuned teacher on KJV text and on BBC text (80 steps at
1e-3, average rank 2; the BBC one added on 2026-12-07 before its runs, with the candidates; the oracles,
named then as what the session could afford, ran after them) and MiniLM-L6's distillation of a fully
fine-tuned genre classifier (240 steps at 1e-3, average rank 2); KJV text joins them (one line in TASKS)
once it passes. Every allocation is trained with rsLoRA scaling (``alpha / sqrt(r)``, equal to uniform
LoRA's scale at the average rank), so a high-rank matrix does not take larger first steps than the rest.
Uniform LoRA is the regime check's arm at the task's average rank (the same seeds, data order and scale:
its runs are read from the regime log and extended there). Each run logs every matrix's ``||Delta W||_F``.

Named before the run (CANDIDATES, CONTRASTS): each candidate against uniform LoRA on the task's held-out
metric (NLL; for distillation KL, or the squared distance to the teacher's hidden states; paired by seed,
improvement = metric(uniform) - metric(candidate)), Holm over each task's family; the paper's allocation
against its shuffled control (does theta know more than the shape of its rank distribution?) and against
itself with alpha / r scaling (does rsLoRA change it?); Holm over the family. Candidates: the paper's
allocation with rsLoRA (the issue's first rerun) and with the plain alpha / r scaling the comparison used, its
shuffled control with rsLoRA, the default (rank aggregation) as it ships (alpha / r) and with rsLoRA, and
``hessian-robust`` with rsLoRA, the rule the teacher screen (``screen.py``) scored best on the BBC task; and
peft's EVA ranks (its rank redistribution, rho = 2, with LoRA's standard initialisation) with rsLoRA, a
comparison arm (added on 2026-12-06 before its runs, with the encoder distillation task). On the distillation
tasks, diagnostics (ORACLES, each its own family, added on 2026-12-06 before their runs): the greedy
allocation on the teacher's own update spectra, whitened by the inputs and plain, against uniform LoRA: the
ceiling of any rule that estimates where the teacher's update lies. Seeds in the CPU configuration: what a
session affords (``--seeds 8`` extends every arm from the logs).

The default, by the rule named before the run (``decide``; DEFAULTS: every candidate but the control and
EVA): over the tasks run together, Stouffer's combination of each task's one-sided paired p-value of an
improvement, Holm over the candidates; a candidate qualifies when that is significant and it is
significantly worse (Holm within the task) on no task; the best qualifying one by Z ships. If none
qualifies, the best-ranked candidate worse on no task ships, and the result says so.
"""

from __future__ import annotations

import copy
import dataclasses
import sys
import textwrap
import time

import numpy as np
import sensilora
import torch
from sensilora.allocation.rules import depth_and_type
from sensilora.integrations.report import budget_by_kind

from benchmarks.common import environment, write_results
from benchmarks.quality import methods as M
from benchmarks.quality import regime
from benchmarks.quality import rules as R
from benchmarks.quality.options import parse
from benchmarks.quality.paired import holm, one_sided, paired_difference, stouffer
from benchmarks.quality.run_quality import RunLog, run_methods
from benchmarks.quality.screen import hessian_stats

RSLORA = "-rs"  # a candidate whose name ends so trains with rsLoRA scaling; the others with alpha / r
CANDIDATES = ("paper-rs", "shuffled-rs", "rank-rs", "paper", "robust-rs", "rank", "eva-ranks-rs")
# may ship; the shuffled control may not, nor EVA's ranks (peft's method, the comparison every table keeps)
DEFAULTS = ("rank", "rank-rs", "paper", "paper-rs", "robust-rs")
EVA = "eva-ranks-rs"
EVA_PARAMS = "eva-params-rs"  # EVA's rule at uniform LoRA's parameters (eva_params.py): a comparison, like EVA
STRUCTURAL = "structural-rs"  # the data-free structural prior (rule="structural"), rsLoRA
# diagnostics, not candidates: they read the distillation teacher no user has. The power of diag(h) that
# weighs the teacher's update: 1/2 its output energy on the calibration inputs (the screen's oracle), 0 its
# plain Frobenius energy (immune to massive activations, which dominate the whitened energy on SmolLM2)
ORACLES = {"oracle-rs": 0.5, "oracle-plain-rs": 0.0}
ALPHA = 0.05
UNIFORM = "uniform"  # stands for the regime check's arm at the task's average rank in CONTRASTS
CONTRASTS = [(c, UNIFORM) for c in CANDIDATES] + [("paper-rs", "shuffled-rs"), ("paper-rs", "paper")]
DIAGNOSTICS = [(o, UNIFORM) for o in ORACLES]  # each its own family: the candidates' Holm correction stays
# the plateau variant of the encoder distillation trains 4x longer: there only the default, the paper's
# allocation (rsLoRA) and the whitened oracle (named on 2026-12-06 before its runs; outside ``decide``)
PLATEAU_ARMS = ("rank", "paper-rs", "oracle-rs")
CONFIGS = {
    "cpu": {**regime.CONFIGS["cpu"], "nlg_seeds": 2, "distill_seeds": 3, "enc_distill_long_arms": PLATEAU_ARMS},
    "smoke": {**regime.CONFIGS["smoke"], "nlg_seeds": 2, "distill_seeds": 2, "enc_distill_long_arms": PLATEAU_ARMS},
}
# those that pass the regime check, and the plateau variant of one of them
TASKS = {key: regime.TASKS[key] for key in ("nlg", "distill", "bbc_distill", "enc_distill", "enc_distill_long")}


def baseline(avg_rank: int) -> str:
    """The regime check's run-log name for uniform LoRA (rsLoRA) at ``avg_rank``."""
    return f"lora-rs r={avg_rank}"


def candidate_allocations(context: M.TaskContext, calibration) -> dict:
    """Each sensilora candidate's RankAllocation (the shuffled control's: the paper's, permuted per seed by
    ``build``), its scaling recorded in its config; EVA's ranks are computed into ``context`` (peft's
    ``get_eva_state_dict`` on the calibration batches)."""
    variant = {c: c.removesuffix(RSLORA).replace("shuffled", "paper") for c in CANDIDATES if c != EVA}
    M.prepare(context, [*sorted(set(variant.values())), "eva-ranks"], calibration, calibration)
    return {
        c: dataclasses.replace(a, config=a.config.replace(use_rslora=c.endswith(RSLORA)))
        for c, a in ((c, context.allocations[v]) for c, v in variant.items())
    }


def oracle_allocation(context: M.TaskContext, teacher_update: dict[str, torch.Tensor], power: float):
    """An allocation's ceiling on a distillation task (the screen's oracle, trained): ranks greedy by worth
    per parameter on the teacher's own update, ``sigma_k(Delta W_m diag(h_m)^power)^2`` (h: the paper's
    calibration statistic; power 1/2: the update whitened by its inputs), at uniform LoRA's parameters,
    rsLoRA. If even this allocation does not beat uniform LoRA, no statistic that estimates it can."""
    template, stats = context.allocations["paper"], hessian_stats(context)
    spectra = {n: R.whitened_spectrum(teacher_update[n], stats.hessian_diag(n), power) for n in template.shapes}
    ranks = R.greedy_ranks(spectra, template.shapes, context.avg_rank)
    return dataclasses.replace(template, ranks=ranks, config=template.config.replace(use_rslora=True))


def structural_allocation(context: M.TaskContext):
    """The structural prior (``AllocationConfig(rule="structural")``: theta = depth + 1, no data) at uniform
    LoRA's parameters, rsLoRA: the baseline every data-driven rule must beat (issue 22)."""
    config = sensilora.AllocationConfig(avg_rank=context.avg_rank, budget="params", rule="structural", use_rslora=True)
    return sensilora.allocate(hessian_stats(context), config, model=context.base)


def build(setup, context, allocations):
    def make(method: str, _context, seed: int):
        if method == baseline(context.avg_rank):
            return regime.uniform_rslora(setup, context.avg_rank, context.avg_rank), None
        if method in (EVA, EVA_PARAMS):  # per-module ranks (0: no adapter), LoRA's initialisation
            ranks = M.eva_ranks(context) if method == EVA else allocations[method].ranks
            return regime.uniform_rslora(setup, context.avg_rank, context.avg_rank, ranks), None
        allocation = allocations[method]
        if method.startswith("shuffled"):
            allocation = M.shuffled_allocation(allocation, seed)
        model = sensilora.get_peft_model(
            copy.deepcopy(context.base), allocation, lora_alpha=2 * context.avg_rank, task_type=context.task_type
        )
        return model, None

    return make


def summarise(
    results, uniform: str, primary: str = "nll", family=CONTRASTS, diagnostics=DIAGNOSTICS
) -> tuple[list[dict], list[dict]]:
    """Rows per arm (the held-out ``primary`` metric, update norms by module type) and the named contrasts
    over the seeds every arm has: ``family`` Holm-corrected together, each of ``diagnostics`` on its own
    (pairs (method, baseline), UNIFORM for uniform LoRA, whose run-log name is ``uniform``); a pair whose arms
    did not both run is left out."""
    by_method = {}
    for result in results:
        by_method.setdefault(result.method, {})[result.seed] = result
    seeds = sorted(set.intersection(*(set(runs) for runs in by_method.values())))
    nll = {m: np.array([by_method[m][s].metrics[primary] for s in seeds]) for m in by_method}
    rows = []
    for method, runs in by_method.items():
        norms = [runs[s].update_norms for s in seeds if runs[s].update_norms]
        by_type = {}
        for name in norms[0] if norms else {}:
            by_type.setdefault(depth_and_type(name)[1], []).append(np.mean([n[name] for n in norms]))
        means = {f"{k}_mean": float(np.mean([runs[s].metrics[k] for s in seeds]))
                 for k in runs[seeds[0]].metrics if k != "seconds"}  # fmt: skip
        rows.append({"method": method, "seeds": len(seeds), "metric": primary, **means,
                     f"{primary}_std": float(nll[method].std(ddof=1)) if len(seeds) > 1 else 0.0,
                     "trainable_params": runs[seeds[0]].trainable_parameters,
                     "update_norm_by_type": {k: float(np.mean(v)) for k, v in by_type.items()}})  # fmt: skip
    contrasts = []
    for method, against in [*family, *diagnostics]:  # "baseline": the arm as named there (UNIFORM: uniform LoRA)
        other = uniform if against == UNIFORM else against
        if method in nll and other in nll:
            contrasts.append({"contrast": f"{method} vs {other}", "method": method, "baseline": against,
                              "n": len(seeds), "diagnostic": (method, against) in diagnostics,
                              **paired_difference(nll[method], nll[other], higher_is_better=False)})  # fmt: skip
    adjusted = holm({c["contrast"]: c["p"] for c in contrasts if np.isfinite(c["p"]) and not c["diagnostic"]})
    for c in contrasts:
        c["p_holm"] = c["p"] if c["diagnostic"] else adjusted.get(c["contrast"], float("nan"))
    return rows, contrasts


def tag(rows: list[dict], contrasts: list[dict], task: str, metric: str) -> None:
    """Mark every row and contrast with its ``task`` and every contrast with its ``metric`` (tables and plots
    hold several tasks)."""
    for item in (*rows, *contrasts):
        item["task"] = task
    for contrast in contrasts:
        contrast["metric"] = metric


def decide(contrasts: list[dict]) -> dict:
    """The default by the rule named before the run. Per candidate in DEFAULTS and task, its paired
    contrast with uniform LoRA (Holm within the task); over the tasks, Stouffer's combination of the
    one-sided p-values of an improvement (Holm over the candidates). A candidate *qualifies* when that
    combined test is significant and on no task is it significantly worse (improvement < 0, Holm p < ALPHA);
    the best qualifying one by Z ships. If none qualifies, the best-ranked *safe* one (worse on no task)
    ships, and the decision says so; if none is safe, uniform ranks. A task where not every candidate ran
    (the plateau variant) stays outside the rule."""
    arms = {}
    for c in contrasts:
        arms.setdefault(c["task"], set()).add(c["method"])
    ran = set(DEFAULTS) & set().union(*arms.values())  # the candidates run on some task
    tasks = sorted(t for t in arms if ran <= arms[t])
    found = {}
    for candidate in DEFAULTS:
        mine = {c["task"]: c for c in contrasts
                if c["method"] == candidate and c["baseline"] == UNIFORM and c["task"] in tasks}  # fmt: skip
        if set(mine) != set(tasks) or not all(np.isfinite(c["p"]) for c in mine.values()):
            continue
        z, p = stouffer([one_sided(mine[t]) for t in tasks])
        worse = [t for t in tasks if mine[t]["improvement"] < 0 and mine[t]["p_holm"] < ALPHA]
        found[candidate] = {"z": z, "p": p, "worse_on": worse,
                            "improvement": {t: mine[t]["improvement"] for t in tasks}}  # fmt: skip
    adjusted = holm({c: v["p"] for c, v in found.items()})
    for candidate, value in found.items():
        value["p_holm"] = adjusted[candidate]
        value["qualifies"] = bool(value["p_holm"] < ALPHA and value["z"] > 0 and not value["worse_on"])
    ranked = sorted(found, key=lambda c: -found[c]["z"])
    winners = [c for c in ranked if found[c]["qualifies"]]
    safe = [c for c in ranked if not found[c]["worse_on"]]
    default = (winners or safe or ["uniform ranks"])[0]
    why = "qualifies" if winners else ("best-ranked safe candidate; none qualifies" if safe else "none is safe")
    outside = sorted(set(arms) - set(tasks))
    return {"tasks": tasks, "outside": outside, "candidates": found, "default": default, "why": why, "alpha": ALPHA}


def plot(contrasts: list[dict], decision: dict, path) -> None:
    """Each candidate's paired improvement over uniform LoRA with its 95 % interval, one panel per task."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    tasks = list(dict.fromkeys(c["task"] for c in contrasts))
    figure = Figure(figsize=(5 * len(tasks), 3.8), constrained_layout=True)
    FigureCanvasAgg(figure)
    for index, task in enumerate(tasks):
        axis = figure.add_subplot(1, len(tasks), index + 1)
        mine = [c for c in contrasts if c["task"] == task and c["baseline"] == UNIFORM]
        names = [c["method"] for c in mine]
        means = np.array([c["improvement"] for c in mine])
        low, high = np.array([c["ci_low"] for c in mine]), np.array([c["ci_high"] for c in mine])
        colours = ["tab:green" if n == decision["default"] else "tab:orange" if c["diagnostic"] else "tab:blue"
                   for n, c in zip(names, mine)]  # fmt: skip
        axis.barh(names, means, color=colours, xerr=np.nan_to_num([means - low, high - means]), capsize=3)
        axis.axvline(0, color="black", linewidth=0.8)
        axis.invert_yaxis()
        axis.set_title(textwrap.fill(f"{task} (n = {mine[0]['n'] if mine else 0} seeds)", 60), fontsize=9)
        metric = mine[0].get("metric", "nll") if mine else "nll"
        axis.set_xlabel(f"improvement over uniform LoRA ({regime.METRIC_LABELS.get(metric, metric)})")
    figure.savefig(path, dpi=120)


def confirm_task(key: str, config: dict, device: torch.device, results_dir, smoke: bool):
    """One task's arms (resumed from the logs): (rows, contrasts, record)."""
    label, make_setup = TASKS[key]
    started = time.perf_counter()
    setup = make_setup(config, device)
    context = regime.task_context(key, setup, config)
    avg = context.avg_rank
    allocations = candidate_allocations(context, setup.calibration)
    if setup.teacher_update is not None:
        for oracle, power in ORACLES.items():
            allocations[oracle] = oracle_allocation(context, setup.teacher_update, power)
    wanted = config.get(f"{key}_arms", (*CANDIDATES, *ORACLES))  # oracles only where there is a teacher
    arms = [arm for arm in (*CANDIDATES, *ORACLES) if arm in wanted and (arm in allocations or arm == EVA)]
    context.allocations = allocations  # the run log's fingerprints: the ranks each candidate trains with
    baseline_log = RunLog(None if smoke else results_dir / "regime_cpu.runs.jsonl")
    log = RunLog(None if smoke else results_dir / "confirm_cpu.runs.jsonl")
    common = (config[f"{key}_seeds"], setup.epoch, config[f"{key}_lr"], setup.evaluators["test"],
              config[f"{key}_checkpoints"], label)  # fmt: skip
    make = build(setup, context, allocations)
    results = run_methods(context, [baseline(avg)], *common, baseline_log, build=make)
    results += run_methods(context, arms, *common, log, build=make)
    rows, contrasts = summarise(results, baseline(avg), setup.primary)
    tag(rows, contrasts, label, setup.primary)
    eva = dataclasses.replace(allocations["paper"], ranks=M.eva_ranks(context))
    shown = {**allocations, EVA: eva}  # each arm's mean rank per module type: where its budget went
    record = {"baseline": baseline(avg), "seconds": round(time.perf_counter() - started, 1), "metric": setup.primary,
              "max_rank": {m: max(a.ranks.values()) for m, a in shown.items()},
              "mean_rank_by_type": {m: {k: row["mean_rank"] for k, row in budget_by_kind(a).items()}
                                    for m, a in shown.items()}}  # fmt: skip
    return rows, contrasts, record


def print_contrasts(contrasts: list[dict]) -> None:
    """One line a contrast: its task, name, paired improvement with 95 % interval, p and Holm p, seeds."""
    for c in contrasts:
        print(f"{c['task']}: {c['contrast']}: {c['improvement']:+.4f} [{c['ci_low']:+.4f}, {c['ci_high']:+.4f}] "
              f"p {c['p']:.3g} Holm {c['p_holm']:.3g} (n={c['n']})")  # fmt: skip


def main(argv=None) -> int:
    args = parse(__doc__, argv, TASKS, seeds_help="paired seeds of every task (default: the configuration's)")
    name = "smoke" if args.smoke else "cpu"
    config = {**CONFIGS[name], **({f"{key}_seeds": args.seeds for key in TASKS} if args.seeds else {})}
    device = torch.device("cpu")
    rows, contrasts, records = [], [], {}
    for key in args.tasks:
        task_rows, task_contrasts, records[TASKS[key][0]] = confirm_task(key, config, device, args.results, args.smoke)
        rows += task_rows
        contrasts += task_contrasts
    decision = decide(contrasts)
    env = {**environment(device), "config": name, "settings": config, "candidates": list(CANDIDATES),
           "contrasts": contrasts, "tasks": records, "decision": decision}  # fmt: skip
    write_results(f"confirm_{name}", env, rows, args.results)
    plot(contrasts, decision, args.results / f"confirm_{name}.png")
    print_contrasts(contrasts)
    for candidate, value in decision["candidates"].items():
        print(f"{candidate}: Stouffer Z {value['z']:+.2f}, Holm p {value['p_holm']:.3g}, "
              f"worse on {value['worse_on'] or 'no task'}")  # fmt: skip
    print(f"default: {decision['default']} ({decision['why']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
