"""Each arm at its own learning rate, chosen on dev: does a per-method rate change the confirmation?

    python -m benchmarks.quality.tuned_lr                        # the CPU configuration, every task
    python -m benchmarks.quality.tuned_lr --tasks bbc_distill    # one task
    python -m benchmarks.quality.tuned_lr --smoke                # seconds: checks the harness

The confirmation (``confirm.py``) trains every arm at one rate, 1e-3. Once each method's rate is tuned,
uniform LoRA matches most LoRA variants in the literature, so a fixed rate could hide a gain or a loss.
Named on 2026-12-07 before its runs:

- Tasks: the decoder distillations on KJV and BBC text, which have a dev split (``setups.dev_windows``:
  windows of training-split documents that no model, the teacher included, trains on; disjoint from test).
  The encoder distillation (MiniLM-L6) joined on 2026-12-07, after the decoder tasks' runs and before any
  of its own, with every rule here unchanged; its dev split is the NLU task's dev verses, on which neither
  the teacher nor a student trains.
- Arms (ARMS): uniform LoRA (rsLoRA; the regime check's arm), the shipped default (rank aggregation,
  alpha / r), rank aggregation with rsLoRA (the best-ranked candidate on the BBC task) and the paper's
  allocation with rsLoRA (the issue's first rerun).
- Search: each arm, seed 0, at each rate of GRID, scored by dev KL at the last step; the lowest wins, a tie
  the smaller rate. A winner at an edge of the rates tried extends them one factor of 2 that way (at most
  MAX_RATES), so a chosen rate has a larger one tried and worse: it is not the edge of divergence.
- Confirmation: each arm at its chosen rate over the confirmation's seeds, scored on test (runs at 1e-3 are
  the confirmation's and the regime check's own, read from their logs). Contrasts: each candidate against
  uniform LoRA, each at its own rate, paired by seed, Holm over the candidates of a task; the confirmation's
  decision rule (``confirm.decide``) over the tasks run.
- Control (CONTROLS, added on 2026-12-07 after the BBC task's runs, before any of its own): the paper's
  allocation shuffled among matrices of the same shape (rsLoRA), searched and confirmed the same way. Does
  a gain at a tuned rate need theta, or only a spread of ranks? Its contrasts (against uniform LoRA, and the
  paper's allocation against it) are diagnostics outside the candidates' Holm family. ``--no-control``
  leaves it out (about 20 min a task on the CPU VM).
- Same rate (a diagnostic, added on 2026-12-07 after the BBC task's candidate runs, before any of uniform
  LoRA's runs at another rate on test): each candidate whose rate differs from uniform LoRA's against
  uniform LoRA trained at the candidate's rate, paired by seed: is a gain the allocation's, or only the
  rate's that uniform LoRA's one-seed dev search turned down?
- Shared rate (a diagnostic, added on 2026-12-07 after every run above, before any run it adds): every arm
  (uniform LoRA, the candidates, the control) at one rate, the one most arms chose on dev (a tie: uniform
  LoRA's if tied, else the larger), over the confirmation's seeds on test. Contrasts and Holm family as at
  the chosen rates, and the confirmation's rule over them (``decision_at_shared_rate``; outside the shipped
  default's rule until the 8-seed runs below): with no arm's rate left to a one-seed search, does any
  allocation beat uniform LoRA?
- More seeds for the shipped default (a diagnostic, added on 2026-12-07 after the shared-rate runs, before
  any run it adds): the shipped default (SHIPPED) and uniform LoRA at the shared rate over 8 paired seeds.
- Every arm at the shared rate over 8 paired seeds (added on 2026-12-07, in the session after the one above,
  before any run it adds; it subsumes that contrast): the shared-rate arms, contrasts and rule over
  ``shared_seeds`` (8 on the CPU, the issue's least; ``--seeds N`` for another count) instead of the
  confirmation's 3. What it decides: the shipped default changes if a candidate qualifies here (its Stouffer
  combination over the three tasks significant after Holm, significantly worse on none), to the best
  qualifying one; or, if SHIPPED is significantly worse than uniform LoRA on a task here, to the best-ranked
  safe candidate. Otherwise it stays: among candidates that tie uniform LoRA the order by Z is noise, and
  the four-task confirmation (which has the NLG task these three lack) keeps choosing SHIPPED.
- The structural prior at the shared rate (a diagnostic, added on 2026-12-07 in the session after the one
  above, before any run it adds): on the held-out task (``holdout.py``) the data-free structural prior
  (``AllocationConfig(rule="structural")``: theta = depth + 1, rsLoRA), which issue 22 names as the baseline
  every data-driven rule must beat and which had never been trained, led uniform LoRA on its first seeds.
  STRUCTURAL at the shared rate over ``shared_seeds`` seeds on each task; contrasts, each on its own, paired
  by seed: against uniform LoRA and against the shipped default. Over the tasks, Stouffer's combination of
  its one-sided p-values against uniform LoRA (``structural_prior``). What it decides: nothing ships on it
  (it was picked after a look at the held-out task); if the combination is significant (p < ALPHA) and it is
  significantly worse than uniform LoRA on no task, it joins the candidates of the next confirmation.
- The structural prior at its own rate (added on 2026-12-07, in the session after the one above, before any
  run it adds): 4e-3 was the other arms' rate, not one searched for the prior, and the issue asks for each
  method's rate tuned on dev. STRUCTURAL searched on dev like every arm (seed 0, GRID, the same extensions;
  left out of the shared rate), then over ``shared_seeds`` seeds on test at its chosen rate, and uniform LoRA
  at its own chosen rate over as many seeds. Contrasts, each on its own, paired by seed: the prior at its
  rate against uniform LoRA at uniform LoRA's rate (baseline OWN_RATES: the one that decides); where its rate
  is neither uniform LoRA's nor the shared one, against uniform LoRA at the prior's rate (SAME_RATE, a
  diagnostic). What it decides: nothing ships on it; it joins the next confirmation's candidates if, over
  the tasks, Stouffer's combination of its one-sided p-values at its own rate is below ALPHA / 2 (Bonferroni
  over this look and the shared-rate one) and it is significantly worse than uniform LoRA on no task
  (``structural_prior(contrasts, OWN_RATES, ALPHA / 2)``).
"""

from __future__ import annotations

import sys
import time
from collections import Counter
from functools import partial

import numpy as np
import torch

from benchmarks.common import environment, write_results
from benchmarks.quality import confirm, regime
from benchmarks.quality.options import parse
from benchmarks.quality.paired import one_sided, paired_difference, stouffer
from benchmarks.quality.run_quality import RunLog, run_methods

ARMS = ("rank", "rank-rs", "paper-rs")  # and uniform LoRA
CONTROLS = ("shuffled-rs",)
FAMILY = [(arm, confirm.UNIFORM) for arm in ARMS]  # Holm-corrected together
DIAGNOSTICS = [(c, confirm.UNIFORM) for c in CONTROLS] + [("paper-rs", c) for c in CONTROLS]
SAME_RATE = "uniform at the same rate"  # the baseline of the same-rate diagnostic
SHARED = "uniform at the shared rate"  # the baseline of the shared-rate diagnostics
OWN_RATES = "uniform at its own rate"  # the baseline of the structural prior at its own rate
SHIPPED = "rank"  # the shipped default (AllocationConfig()'s rank aggregation, alpha / r)
PRIOR_CONTRASTS = [(confirm.STRUCTURAL, confirm.UNIFORM), (confirm.STRUCTURAL, SHIPPED)]
GRID = (5e-4, 1e-3, 2e-3)
MAX_RATES = 5
CONFIGS = {"cpu": {**confirm.CONFIGS["cpu"], "shared_seeds": 8}, "smoke": confirm.CONFIGS["smoke"]}
TASKS = {key: regime.TASKS[key] for key in ("distill", "bbc_distill", "enc_distill")}


def chosen_rate(scores: dict[float, float]) -> float:
    """The rate of the lowest dev metric (``scores``: rate -> metric, lower is better); a tie, the smaller; a
    non-finite metric (divergence) loses to every finite one."""
    return min(scores, key=lambda rate: (scores[rate] if np.isfinite(scores[rate]) else np.inf, rate))


def shared_rate(rates: dict[str, float], uniform: str) -> float:
    """The rate most arms chose (``rates``: arm -> chosen rate); a tie, ``uniform``'s rate if it is among the
    tied, else the larger."""
    counts = Counter(rates.values())
    tied = [rate for rate, count in counts.items() if count == max(counts.values())]
    return rates[uniform] if rates[uniform] in tied else max(tied)


def next_rate(scores: dict[float, float]) -> float | None:
    """The rate to try next: where the best of ``scores`` sits at an edge of the rates tried, one factor of 2
    beyond it; None once it is inside them or MAX_RATES are tried."""
    best = chosen_rate(scores)
    if len(scores) >= MAX_RATES:
        return None
    if best == max(scores):
        return best * 2
    if best == min(scores):
        return best / 2
    return None


def search(run, rates=GRID) -> dict[float, float]:
    """{rate: dev metric} of one arm, ``run(rate)`` giving its dev metric, over ``rates`` and the extensions
    ``next_rate`` asks for."""
    scores = {rate: run(rate) for rate in rates}
    while (rate := next_rate(scores)) is not None:
        scores[rate] = run(rate)
    return scores


def tune_task(key: str, config: dict, device: torch.device, results_dir, smoke: bool, controls: bool = True,
              shared_seeds: int | None = None):  # fmt: skip
    """One task's search and confirmation (resumed from the logs): (rows, contrasts, record); every arm at
    the shared rate over ``shared_seeds`` seeds (default: the confirmation's)."""
    label, make_setup = TASKS[key]
    started = time.perf_counter()
    setup = make_setup(config, device)
    context = regime.task_context(key, setup, config)
    allocations = confirm.candidate_allocations(context, setup.calibration)
    context.allocations = allocations  # the run logs' fingerprints: the ranks each candidate trains with
    allocations[confirm.STRUCTURAL] = confirm.structural_allocation(context)
    make = confirm.build(setup, context, allocations)
    uniform = confirm.baseline(context.avg_rank)
    seeds, steps = config[f"{key}_seeds"], config[f"{key}_steps"]
    dev_log = RunLog(None if smoke else results_dir / "tuned_lr_cpu.runs.jsonl")
    arms = (uniform, *ARMS, *(CONTROLS if controls else ()))
    test_logs = {arm: RunLog(None if smoke else results_dir / ("regime_cpu.runs.jsonl" if arm == uniform
                                                                else "confirm_cpu.runs.jsonl"))
                 for arm in (*arms, confirm.STRUCTURAL)}  # fmt: skip

    def dev_metric(arm: str, rate: float) -> float:
        (result,) = run_methods(context, [arm], 1, setup.epoch, rate, setup.evaluators["dev"], (steps,),
                                f"{label} dev", dev_log, build=make)  # fmt: skip
        return result.metrics[setup.primary]

    scores = {arm: search(lambda rate, arm=arm: dev_metric(arm, rate)) for arm in arms}
    rates = {arm: chosen_rate(s) for arm, s in scores.items()}

    def on_test(arm: str, rate: float, seeds: int = seeds) -> list:
        return run_methods(context, [arm], seeds, setup.epoch, rate, setup.evaluators["test"],
                           config[f"{key}_checkpoints"], label, test_logs[arm], build=make)  # fmt: skip

    results = [result for arm, rate in rates.items() for result in on_test(arm, rate)]
    rows, contrasts = confirm.summarise(results, uniform, setup.primary, FAMILY, DIAGNOSTICS)
    for arm in (a for a in ARMS if rates[a] != rates[uniform]):
        contrasts.append(same_rate_contrast(arm, [r for r in results if r.method == arm],
                                            on_test(uniform, rates[arm]), setup.primary))  # fmt: skip
    for row in rows:
        row["lr"], row["rate_from"] = rates[row["method"]], "dev search"
    shared = shared_rate(rates, uniform)
    at_shared = [result for arm in arms for result in on_test(arm, shared, shared_seeds or seeds)]
    shared_rows, shared_contrasts = confirm.summarise(at_shared, uniform, setup.primary, FAMILY, DIAGNOSTICS)
    prior = [r for r in at_shared if r.method in (uniform, SHIPPED)] + on_test(confirm.STRUCTURAL, shared,
                                                                               shared_seeds or seeds)  # fmt: skip
    prior_rows, prior_contrasts = confirm.summarise(prior, uniform, setup.primary, [], PRIOR_CONTRASTS)
    shared_rows += [row for row in prior_rows if row["method"] == confirm.STRUCTURAL]
    shared_contrasts += prior_contrasts
    rows += [{**row, "lr": shared, "rate_from": "shared"} for row in shared_rows]
    for contrast in shared_contrasts:  # Holm over the candidates at the shared rate, kept apart from the above
        contrast["contrast"] += f" at the shared rate {shared:g}"
        contrast["baseline"] = SHARED if contrast["baseline"] == confirm.UNIFORM else contrast["baseline"]
        contrast["diagnostic"] = True
    contrasts += shared_contrasts
    # the structural prior's own search, after the shared rate is set (it stays out of that)
    scores[confirm.STRUCTURAL] = search(partial(dev_metric, confirm.STRUCTURAL))
    rates[confirm.STRUCTURAL] = chosen_rate(scores[confirm.STRUCTURAL])
    own_rows, own_contrasts = prior_at_own_rate(rates, uniform, shared, on_test, setup.primary,
                                                shared_seeds or seeds)  # fmt: skip
    rows += own_rows
    contrasts += own_contrasts
    confirm.tag(rows, contrasts, label, setup.primary)
    record = {"baseline": uniform, "seconds": round(time.perf_counter() - started, 1), "metric": setup.primary,
              "dev_scores": {arm: {str(r): v for r, v in sorted(s.items())} for arm, s in scores.items()},
              "rates": rates, "shared_rate": shared}  # fmt: skip
    return rows, contrasts, record


def prior_at_own_rate(rates: dict[str, float], uniform: str, shared: float, on_test, primary: str,
                      seeds: int) -> tuple[list[dict], list[dict]]:  # fmt: skip
    """The structural prior at its own rate (module docstring): ``on_test(arm, rate, seeds)`` for it and for
    uniform LoRA (``uniform``), each at its rate chosen on dev (``rates``: arm -> rate), and, where the
    prior's is neither uniform LoRA's nor ``shared``, uniform LoRA at the prior's: (rows, contrasts)."""
    own = rates[confirm.STRUCTURAL]
    mine = on_test(confirm.STRUCTURAL, own, seeds)
    rows, contrasts = confirm.summarise(mine + on_test(uniform, rates[uniform], seeds), uniform, primary, [],
                                       [(confirm.STRUCTURAL, confirm.UNIFORM)])  # fmt: skip
    for row in rows:
        row["lr"], row["rate_from"] = rates[row["method"]], "own rate (structural prior)"
    for contrast in contrasts:
        contrast["contrast"] = f"{confirm.STRUCTURAL} at {own:g} vs uniform LoRA at {rates[uniform]:g}"
        contrast["baseline"] = OWN_RATES
    if own not in (rates[uniform], shared):
        contrasts.append(same_rate_contrast(confirm.STRUCTURAL, mine, on_test(uniform, own, seeds), primary))
    return rows, contrasts


def structural_prior(contrasts: list[dict], baseline: str = SHARED, alpha: float = confirm.ALPHA) -> dict:
    """The structural prior over the tasks against uniform LoRA (``baseline``: SHARED at the shared rate,
    OWN_RATES each at its own; module docstring): Stouffer's combination of its one-sided p-values, the tasks
    where it is significantly worse (its own p < confirm.ALPHA, no correction: the stricter reading for
    safety), and whether it joins the next confirmation's candidates (the combination below ``alpha``)."""
    mine = [c for c in contrasts if c["method"] == confirm.STRUCTURAL and c["baseline"] == baseline]
    if not mine:
        return {"tasks": []}
    z, p = stouffer([one_sided(c) for c in mine])
    worse = [c["task"] for c in mine if c["improvement"] < 0 and c["p"] < confirm.ALPHA]
    return {"tasks": [c["task"] for c in mine], "z": z, "p": p, "worse_on": worse,
            "improvement": {c["task"]: c["improvement"] for c in mine},
            "alpha": alpha, "joins_the_candidates": bool(p < alpha and z > 0 and not worse)}  # fmt: skip


def shipped_default(at_shared: dict) -> tuple[str, str]:
    """(the shipped default, why) by the rule named before the 8-seed shared-rate runs (module docstring):
    ``at_shared`` is ``confirm.decide`` over the shared-rate contrasts; SHIPPED stays unless a candidate
    qualifies there, or SHIPPED is significantly worse than uniform LoRA on one of its tasks."""
    if at_shared["why"] == "qualifies":
        return at_shared["default"], "qualifies at the shared rate"
    worse = at_shared["candidates"].get(SHIPPED, {}).get("worse_on")
    if worse:
        return at_shared["default"], f"{SHIPPED} is significantly worse on {', '.join(worse)}; {at_shared['why']}"
    return SHIPPED, "none qualifies at the shared rate and it is significantly worse on no task: it stays"


def same_rate_contrast(arm: str, mine: list, uniform: list, primary: str, name: str | None = None) -> dict:
    """``arm``'s runs (RunResult) against uniform LoRA's at the same rate, paired by seed (a diagnostic);
    ``name``: the contrast's, if the rate is not ``arm``'s own."""
    theirs = {r.seed: r.metrics[primary] for r in uniform}
    seeds = sorted(set(theirs) & {r.seed for r in mine})
    ours = {r.seed: r.metrics[primary] for r in mine}
    difference = paired_difference(np.array([ours[s] for s in seeds]), np.array([theirs[s] for s in seeds]),
                                   higher_is_better=False)  # fmt: skip
    return {"contrast": name or f"{arm} vs uniform LoRA at {arm}'s rate", "method": arm, "baseline": SAME_RATE,
            "n": len(seeds), "diagnostic": True, "uniform_mean": float(np.mean([theirs[s] for s in seeds])),
            **difference, "p_holm": difference["p"]}  # fmt: skip


def plot(records: dict, path) -> None:
    """Each arm's dev metric against the learning rate (log scale), the chosen rate marked; a panel a task
    (a record's "scored_on": the seeds the dev metric is over, seed 0 unless it says)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(5 * len(records), 3.6), constrained_layout=True)
    FigureCanvasAgg(figure)
    for index, (task, record) in enumerate(records.items()):
        axis = figure.add_subplot(1, len(records), index + 1)
        for arm, scores in record["dev_scores"].items():
            rates = sorted(float(r) for r in scores)
            line = axis.plot(rates, [scores[str(r)] for r in rates], marker="o", label=arm)[0]
            axis.plot([record["rates"][arm]], [scores[str(record["rates"][arm])]], marker="*", markersize=14,
                      color=line.get_color())  # fmt: skip
        axis.set_xscale("log")
        tried = sorted({float(r) for scores in record["dev_scores"].values() for r in scores})
        axis.set_xticks(tried, [f"{r:g}" for r in tried])
        axis.minorticks_off()
        axis.set_xlabel("learning rate")
        metric = regime.METRIC_LABELS.get(record["metric"], record["metric"])
        axis.set_ylabel(f"dev {metric} ({record.get('scored_on', 'seed 0')})")
        axis.set_title(task, fontsize=9)
        axis.legend(fontsize=7)
    figure.savefig(path, dpi=120)


def main(argv=None) -> int:
    args = parse(
        __doc__,
        argv,
        TASKS,
        flags={"--no-control": "leave the shuffled control out"},
        seeds_help="seeds of every arm at the shared rate (default: the configuration's, 8 on the CPU)",
    )
    name = "smoke" if args.smoke else "cpu"
    config, device = CONFIGS[name], torch.device("cpu")
    rows, contrasts, records = [], [], {}
    for key in args.tasks:
        task_rows, task_contrasts, records[TASKS[key][0]] = tune_task(
            key,
            config,
            device,
            args.results,
            args.smoke,
            not args.no_control,
            args.seeds or config.get("shared_seeds"),
        )
        rows += task_rows
        contrasts += task_contrasts
    decision = confirm.decide(contrasts)
    at_shared = confirm.decide([{**c, "baseline": confirm.UNIFORM} for c in contrasts if c["baseline"] == SHARED])
    shipped, why = shipped_default(at_shared)
    env = {**environment(device), "config": name, "settings": config, "arms": list(ARMS),
           "controls": list(CONTROLS), "grid": list(GRID), "contrasts": contrasts, "tasks": records,
           "decision": decision, "decision_at_shared_rate": at_shared,
           "shipped_default": {"default": shipped, "why": why},
           "structural_prior": structural_prior(contrasts),
           "structural_prior_at_own_rate": structural_prior(contrasts, OWN_RATES, confirm.ALPHA / 2)}  # fmt: skip
    write_results(f"tuned_lr_{name}", env, rows, args.results)
    plot(records, args.results / f"tuned_lr_{name}.png")
    for task, record in records.items():
        print(f"{task}: rates chosen on dev {record['rates']}")
    confirm.print_contrasts(contrasts)
    covered = len(decision["tasks"])
    print(f"the confirmation's rule over these {covered} tasks at the chosen rates (a diagnostic): "
          f"{decision['default']} ({decision['why']})")  # fmt: skip
    print(f"the same rule at the shared rate: {at_shared['default']} ({at_shared['why']})")
    print(f"the shipped default by it: {shipped} ({why})")
    print(f"the structural prior over the tasks at the shared rate: {env['structural_prior']}")
    print(f"the structural prior over the tasks at its own rate: {env['structural_prior_at_own_rate']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
