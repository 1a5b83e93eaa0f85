"""Which allocation rules are worth training? The teacher update-energy screen, before any training of them.

    python -m benchmarks.quality.screen                 # the CPU configuration (cost per task in the results)
    python -m benchmarks.quality.screen --tasks nlg     # one task
    python -m benchmarks.quality.screen --smoke         # seconds: checks the harness (used by the tests)

A teacher is trained once per task and seed: every target matrix fine-tuned in full (with the classification
head where there is one), on the task's training batches in the seed's order. Its update of matrix m,
``Delta W_m`` (d_out, d_in), changes the matrix's output on the calibration text by ``E ||Delta W_m x||^2
= ||Delta W_m diag(h_m)^1/2||_F^2 / 2`` in the diagonal approximation (``h_m = (2/N) sum x^2``, the
paper's statistic), so ``M_m = Delta W_m diag(h_m)^1/2`` is the update whitened by its inputs. A rank-r_m
adapter holds at most the top r_m singular values of M_m: an allocation's score is the share of the
teacher's whitened update energy it can hold, ``sum_m sum_{k<=r_m} sigma_k(M_m)^2 / sum_m ||M_m||_F^2``,
all at uniform LoRA's trainable parameters. The oracle is the greedy allocation on the teacher's own
spectra (``rules.greedy_ranks``); the oracle of the other teacher seed, scored on this one, shows how much
of the oracle is the task rather than one run's noise.

Named before the run. Per task and rule: the gap closed, ``(score - score_uniform) / (score_oracle -
score_uniform)``, averaged over teacher seeds. A rule is worth a confirmation run (``worth_training``)
where it closes at least half the gap (GAP_TO_TRAIN). Stability: each data-driven rule allocated on two
disjoint halves of the calibration batches; the Spearman correlation of the two rank vectors and the share
of the budget they spend alike. Secondary: the share of the unwhitened energy ``||Delta W_m||_F^2``.
Every rule spends at most the budget (``spend`` in the table: EVA redistributes ranks, not parameters).
Each task's screen is logged as it ends (``screen_<config>.tasks.jsonl``); a rerun with the same settings
reuses it and only rewrites the tables and the plot.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from sensilora.integrations.report import budget_by_kind
from tqdm import tqdm

from benchmarks.common import environment, write_results
from benchmarks.quality import methods as M
from benchmarks.quality import rules as R
from benchmarks.quality.options import parse
from benchmarks.quality.setups import nlg_setup, nlu_setup
from benchmarks.quality.train import train_teacher, trainable_targets

GAP_TO_TRAIN = 0.5
SHUFFLES = 5  # permutations of the paper's ranks averaged for the shuffled control
VARIANTS = tuple(M.SENSILORA_VARIANTS)
SCORES = ("whitened_share", "gap_closed", "gap_closed_min", "unwhitened_share")
CONFIGS = {
    "cpu": {
        "teacher_seeds": 2, "nlu_train": 120, "nlu_dev": 40, "nlu_test": 100, "nlu_len": 48, "nlu_batch": 16,
        "nlu_teacher_steps": 360, "nlu_teacher_lr": 1e-4, "nlu_avg_rank": 4, "nlg_docs": 300, "nlg_len": 64,
        "nlg_batch": 4, "nlg_teacher_steps": 120, "nlg_teacher_lr": 1e-4, "nlg_eval_windows": 24, "nlg_avg_rank": 8,
        "calibration_samples": 64,
    },
    "smoke": {
        "teacher_seeds": 2, "nlu_train": 3, "nlu_dev": 2, "nlu_test": 2, "nlu_len": 16, "nlu_batch": 4,
        "nlu_teacher_steps": 2, "nlu_teacher_lr": 1e-4, "nlu_avg_rank": 4, "nlg_docs": 8, "nlg_len": 16,
        "nlg_batch": 2, "nlg_teacher_steps": 2, "nlg_teacher_lr": 5e-5, "nlg_eval_windows": 2, "nlg_avg_rank": 8,
        "calibration_samples": 16,
    },
}  # fmt: skip
TASKS = {"nlu": ("NLU (MiniLM-L6, KJV genres)", nlu_setup), "nlg": ("NLG (SmolLM2-135M, BBC text)", nlg_setup)}


def mean_gradients(setup, batches) -> dict[str, torch.Tensor]:
    """The loss gradient of every target weight at the base weights, averaged over ``batches`` (the head,
    where there is one, freshly initialised with seed 0 as a user's would be)."""
    model = copy.deepcopy(setup.base)
    modules = trainable_targets(model, setup.targets, seed=0)
    for batch in batches:
        model(**batch).loss.backward()
    return {name: module.weight.grad / len(batches) for name, module in modules.items()}


def allocations(setup, batches, avg_rank: int, with_eva: bool) -> tuple[dict[str, dict[str, int]], M.TaskContext]:
    """Every rule's ranks from the calibration ``batches`` (the data-driven rules read nothing else), and the
    context that holds the library variants' allocations and statistics."""
    context = M.TaskContext(setup.base, setup.targets, avg_rank, setup.task_type, steps=1)
    M.prepare(context, [*VARIANTS, *(["eva-ranks"] if with_eva else [])], batches, batches)
    found = {variant: context.allocations[variant].ranks for variant in VARIANTS}
    shapes = context.allocations["paper"].shapes
    for variant in ("paper", "rank"):
        found[f"{variant}-pooled"] = R.pooled_ranks(context.allocations[variant].theta, shapes, avg_rank)
    gradients = mean_gradients(setup, batches)
    hessians = {name: hessian_stats(context).hessian_diag(name) for name in shapes}
    modules = dict(setup.base.named_modules())
    found["gora"] = R.gora_ranks({n: modules[n].weight.detach() for n in shapes}, gradients, shapes, avg_rank)
    found["gradient-spectrum"] = R.greedy_ranks(R.gradient_spectrum_values(gradients, hessians), shapes, avg_rank)
    if with_eva:
        found["eva-ranks"] = M.eva_ranks(context)
    for seed in range(SHUFFLES):
        found[f"shuffled#{seed}"] = M.shuffled_allocation(context.allocations["paper"], seed).ranks
    found["uniform"] = dict.fromkeys(shapes, avg_rank)
    found["structural"] = R.structural_ranks(shapes, avg_rank)
    return found, context


def hessian_stats(context: M.TaskContext):
    """The Hessian-diagonal statistics ``M.prepare`` calibrated for the paper's variant (no options)."""
    return context.stats[tuple(sorted(M.SENSILORA_VARIANTS["paper"][0].items()))]


def type_share_ratio(ranks, template) -> float:
    """The largest (module type's share of the parameters) / (its share under uniform ranks), for ``ranks``
    on the matrices of the allocation ``template``."""
    shares = budget_by_kind(dataclasses.replace(template, ranks=ranks))
    return max(row["share"] / row["uniform_share"] for row in shares.values())


def screen_task(key: str, config: dict, device: torch.device) -> tuple[list[dict], dict]:
    """One task's rows (one per rule) and its record (teachers, cost)."""
    label, make = TASKS[key]
    started = time.perf_counter()
    setup = make(config, device)
    avg = config[f"{key}_avg_rank"]
    if len(setup.calibration) < 2:
        raise SystemExit(
            f"{label}: {len(setup.calibration)} calibration batch(es); the halves need 2: raise calibration_samples"
        )
    full, context = allocations(setup, setup.calibration, avg, with_eva=True)
    halves = [allocations(setup, setup.calibration[part::2], avg, with_eva=False)[0] for part in (0, 1)]
    rules_seconds = time.perf_counter() - started
    template = context.allocations["paper"]
    shapes, hessians = template.shapes, hessian_stats(context)
    teachers, whitened, plain = [], [], []
    for seed in tqdm(range(config["teacher_seeds"]), desc=f"{label}: teachers"):
        deltas, record = train_teacher(setup, config[f"{key}_teacher_steps"], config[f"{key}_teacher_lr"], seed)
        teachers.append(record)
        whitened.append({n: R.whitened_spectrum(d, hessians.hessian_diag(n), 0.5) for n, d in deltas.items()})
        plain.append({n: R.whitened_spectrum(d, torch.ones(d.shape[1]), 0.0) for n, d in deltas.items()})
    oracles = [R.greedy_ranks(energy, shapes, avg) for energy in whitened]
    budget = R.parameter_budget(shapes, avg)

    def scores(ranks_per_teacher) -> dict:
        share = [R.captured(r, e) for r, e in zip(ranks_per_teacher, whitened)]
        low = [R.captured(full["uniform"], e) for e in whitened]
        high = [R.captured(o, e) for o, e in zip(oracles, whitened)]
        gaps = [(s - u) / (o - u) if o > u else float("nan") for s, u, o in zip(share, low, high)]
        unwhitened = [R.captured(r, e) for r, e in zip(ranks_per_teacher, plain)]
        return {"whitened_share": float(np.mean(share)), "gap_closed": float(np.mean(gaps)),
                "gap_closed_min": float(np.min(gaps)), "unwhitened_share": float(np.mean(unwhitened))}  # fmt: skip

    def row(rule: str, ranks_per_teacher, stable=None) -> dict:
        ranks = ranks_per_teacher[0]
        spend = sum(ranks[n] * sum(shapes[n]) for n in shapes) / budget
        result = {"task": label, "rule": rule, **scores(ranks_per_teacher), "spend": spend,
                  "type_share_ratio": type_share_ratio(ranks, template), "max_rank": max(ranks.values())}  # fmt: skip
        if stable is not None:
            result["halves_spearman"] = R.spearman(*stable)
            result["halves_shared_budget"] = R.shared_parameters(*stable, shapes)
        result["worth_training"] = None if rule.startswith("oracle") else bool(result["gap_closed"] >= GAP_TO_TRAIN)
        return result

    teacher_count = config["teacher_seeds"]
    rows = [row("uniform", [full["uniform"]] * teacher_count), row("structural", [full["structural"]] * teacher_count)]
    for rule in [*VARIANTS, "paper-pooled", "rank-pooled", "gora", "gradient-spectrum"]:
        rows.append(row(rule, [full[rule]] * teacher_count, stable=(halves[0][rule], halves[1][rule])))
    rows.append(row("eva-ranks", [full["eva-ranks"]] * teacher_count))
    shuffled = [row("shuffled", [full[f"shuffled#{s}"]] * teacher_count) for s in range(SHUFFLES)]
    rows.append({**shuffled[0], **{k: float(np.mean([r[k] for r in shuffled])) for k in SCORES}})
    rows.append(row("oracle", oracles))
    if teacher_count > 1:  # each teacher scored with the other's oracle (seed s with s+1's, cyclically)
        rows.append(row("oracle (other teacher)", oracles[1:] + oracles[:1]))
    record = {"teachers": teachers, "rules_seconds": round(rules_seconds, 1),
              "seconds": round(time.perf_counter() - started, 1), "budget_parameters": budget}  # fmt: skip
    return rows, record


def read_log(path: Path | None, config: dict) -> dict[str, tuple[list[dict], dict]]:
    """The tasks already screened with these settings ({label: (rows, record)}): a rerun skips them."""
    done = {}
    if path is not None and path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            entry = json.loads(line)
            if entry["settings"] == json.loads(json.dumps(config)):
                done[entry["task"]] = (entry["rows"], entry["record"])
    return done


def append_log(path: Path | None, label: str, config: dict, rows: list[dict], record: dict) -> None:
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps({"task": label, "settings": config, "rows": rows, "record": record}) + "\n")


def plot(rows: list[dict], path: Path) -> None:
    """The gap each rule closes, per task (0: uniform LoRA, 1: the teacher's oracle)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    tasks = list(dict.fromkeys(r["task"] for r in rows))
    figure = Figure(figsize=(6 * len(tasks), 4.6), constrained_layout=True)
    FigureCanvasAgg(figure)
    for index, task in enumerate(tasks):
        axis = figure.add_subplot(1, len(tasks), index + 1)
        mine = [r for r in rows if r["task"] == task and r["rule"] != "oracle"]
        colours = ["tab:green" if r["worth_training"] else "tab:grey" for r in mine]
        axis.barh([r["rule"] for r in mine], [r["gap_closed"] for r in mine], color=colours)
        axis.axvline(GAP_TO_TRAIN, color="tab:red", linestyle="--", linewidth=1)
        axis.axvline(0, color="black", linewidth=0.8)
        axis.invert_yaxis()
        axis.set_title(task, fontsize=9)
        axis.set_xlabel("share of the uniform-to-oracle gap closed (teacher update energy)")
    figure.savefig(path, dpi=120)


def main(argv=None) -> int:
    args = parse(__doc__, argv, TASKS)
    name = "smoke" if args.smoke else "cpu"
    config, device = CONFIGS[name], torch.device("cpu")
    log = None if args.smoke else args.results / f"screen_{name}.tasks.jsonl"
    done = read_log(log, config)
    rows, records = [], {}
    for key in args.tasks:
        label = TASKS[key][0]
        if label not in done:
            done[label] = screen_task(key, config, device)
            append_log(log, label, config, *done[label])
        task_rows, records[label] = done[label]
        rows += task_rows
    env = {**environment(device), "config": name, "settings": config, "gap_to_train": GAP_TO_TRAIN,
           "shuffles": SHUFFLES, "tasks": records}  # fmt: skip
    stem = f"screen_{name}"
    write_results(stem, env, rows, args.results)
    plot(rows, args.results / f"{stem}.png")
    for r in rows:
        print(f"{r['task'][:3]} {r['rule']:<24} gap {r['gap_closed']:+.3f} share {r['whitened_share']:.3f} "
              f"spend {r['spend']:.3f} type x{r['type_share_ratio']:.2f}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
