"""Does the shipped default hold on a task that played no part in choosing it?

    python -m benchmarks.quality.holdout            # the CPU configuration (about 3 h on 2 cores)
    python -m benchmarks.quality.holdout --smoke    # seconds: checks the harness

Every rule of the suite so far was chosen on the same four tasks (``confirm``, ``tuned_lr``). Named on
2026-12-07 before any run of this task:

- Task (``setups.topic_distill_setup``): MiniLM-L6 distilling a teacher fully fine-tuned on BBC News topics
  (5 classes, the first 48 tokens of each article); the students learn its last hidden states on 800
  training articles, 240 steps, average rank 2, scored on 350 held-out articles by the squared distance to
  the teacher's hidden states. No rule, rate or default of the suite was chosen on it.
- Rate: the shared rate ``tuned_lr`` chose on dev for the three tasks of its rule (4e-3), not searched here.
- Regime check: uniform LoRA (rsLoRA) at r = 1 and r = 8 over REGIME_SEEDS paired seeds, the regime check's
  contrast and pass rule (``regime.verdict``).
- Arms over SEEDS paired seeds: uniform LoRA (rsLoRA, r = 2), the shipped default (``tuned_lr.SHIPPED``,
  rank aggregation with alpha / r) and the paper's allocation with rsLoRA; each candidate against uniform
  LoRA, paired by seed, Holm over the two.
- What it decides: the default holds out of sample unless it is significantly worse than uniform LoRA here
  (improvement < 0, Holm p < 0.05). If it is, the result says so (``shipped_default_holds: false``) and the
  default must change; a gain here would not change it (one task, outside the rule that chose it).
- Trained 4x longer (a diagnostic, added on 2026-12-07 after the runs above, before any of its own): at 240
  steps most runs sit on a plateau near the untrained student's distance and some escape it, at seeds and
  times that differ by arm, so the contrast above may measure how soon a run escapes rather than what it
  can reach. Uniform LoRA and the shipped default over LONG_SEEDS seeds for LONG_STEPS steps (the same rate
  and schedule, stretched), the same paired contrast, outside the decision.
- Rates searched on this task's dev split (added on 2026-12-07, in the session after the runs above, before
  any run it adds): at the shared rate most runs of uniform LoRA sit on the plateau, so the rate, not the
  allocation, may decide the contrast. Each arm of the contrast (uniform LoRA, the two candidates) searched
  on the dev split (200 articles no model trains on), scored by the mean dev distance over SEARCH_SEEDS
  seeds (not one: an escape from the plateau is a seed's luck), over SEARCH_RATES extended by
  ``tuned_lr.search``'s rule (a best rate at an edge tries one factor of 2 beyond it, at most
  ``tuned_lr.MAX_RATES`` rates); the lowest wins, a tie the smaller rate. Then every arm at its chosen rate
  over SEEDS seeds on test, the same contrasts and Holm family; the regime check again at uniform LoRA's
  chosen rate; and, if the default's rate differs from uniform LoRA's, uniform LoRA at the default's rate
  (``tuned_lr.same_rate_contrast``, a diagnostic). The rule is the same at the searched rates: the default
  holds out of sample only if it is significantly worse than uniform LoRA neither at the shared rate nor at
  the searched ones.
- The default at uniform LoRA's rate (a diagnostic, added on 2026-12-07 after the searched-rate runs, before
  any of its own): the default's two-seed search chose 4e-3, where half its test seeds stall on the plateau,
  and uniform LoRA's chose 2e-3. If the two rates differ, the default trained at uniform LoRA's chosen rate
  over SEEDS seeds against uniform LoRA there, paired by seed: a user who tuned uniform LoRA's rate and
  switches to the default keeps that rate. Outside the decision.
- The standing arms (a diagnostic, added on 2026-12-07 after every run above, before any of its own): the
  arms the suite keeps in every table, STANDING (the paper's allocation shuffled among matrices of the same
  shape with rsLoRA, EVA's ranks with rsLoRA, the paper's exact method with alpha / r), at uniform LoRA's
  searched rate over SEEDS seeds; each against uniform LoRA there, and the paper's allocation (rsLoRA)
  against its shuffled control, paired by seed, each on its own. Outside the decision.
Every run is logged as it ends (``holdout_<config>.runs.jsonl``): a later invocation resumes.
"""

from __future__ import annotations

import sys
import time

import numpy as np
import torch

from benchmarks.common import environment, write_results
from benchmarks.quality import confirm, regime, tuned_lr
from benchmarks.quality.options import parse
from benchmarks.quality.run_quality import RunLog, run_methods
from benchmarks.quality.setups import topic_distill_setup

TASK = "topic_distill"
LABEL = "Distillation (MiniLM-L6, BBC topic teacher)"
CANDIDATES = (tuned_lr.SHIPPED, "paper-rs")
FAMILY = [(candidate, confirm.UNIFORM) for candidate in CANDIDATES]
REGIME_ARMS = tuple(f"lora-rs r={rank}" for rank in (regime.LOW, regime.HIGH))
SHARED_RATE = 4e-3  # tuned_lr's shared rate (tuned_lr_cpu.json: "shared_rate")
SEARCH_RATES = (2e-3, SHARED_RATE, 8e-3)  # the first rates of the dev search, around the shared one
SEARCHED = "rates searched on dev"
STANDING = ("shuffled-rs", confirm.EVA, "paper")  # the shuffled control, EVA's ranks, the paper's exact method
TASK_KEYS = {
    "topic_distill_steps": 240, "topic_distill_checkpoints": (80, 160, 240), "topic_distill_avg_rank": 2,
    "topic_distill_teacher_steps": 360, "topic_distill_teacher_lr": 1e-4, "topic_distill_cache": True,
    "topic_distill_lr": SHARED_RATE, "topic_train": 160, "topic_dev": 40, "topic_test": 70,
}  # fmt: skip
LONG = {"long_steps": 960, "long_checkpoints": (240, 480, 720, 960), "long_seeds": 3}
CONFIGS = {
    "cpu": {**regime.CONFIGS["cpu"], **TASK_KEYS, **LONG, "seeds": 8, "regime_seeds": 5, "search_seeds": 2},
    "smoke": {**regime.CONFIGS["smoke"], **TASK_KEYS, "topic_distill_steps": 2, "topic_distill_checkpoints": (2,),
              "topic_distill_teacher_steps": 2, "topic_distill_cache": False, "topic_train": 3, "topic_dev": 1,
              "topic_test": 2, "seeds": 2, "regime_seeds": 2, "long_steps": 4, "long_checkpoints": (2, 4),
              "long_seeds": 2, "search_seeds": 1},
}  # fmt: skip


def holds(contrasts: list[dict]) -> bool:
    """Whether the shipped default is not significantly worse than uniform LoRA (Holm p < ALPHA, improvement
    below zero) in ``contrasts`` (``confirm.summarise``'s)."""
    shipped = next(c for c in contrasts if c["method"] == tuned_lr.SHIPPED and c["baseline"] == confirm.UNIFORM)
    return not (shipped["improvement"] < 0 and shipped["p_holm"] < confirm.ALPHA)


def main(argv=None) -> int:
    args = parse(__doc__, argv)
    name = "smoke" if args.smoke else "cpu"
    config, device = CONFIGS[name], torch.device("cpu")
    started = time.perf_counter()
    setup = topic_distill_setup(config, device)
    context = regime.task_context(TASK, setup, config)
    context.allocations = confirm.candidate_allocations(context, setup.calibration)
    arms = confirm.build(setup, context, context.allocations)

    def build(method: str, _context, seed: int):
        if method in regime.METHODS:  # uniform LoRA (rsLoRA) at a rank, alpha for the task's average rank
            return regime.uniform_rslora(setup, regime.METHODS[method], context.avg_rank), None
        return arms(method, _context, seed)

    log = RunLog(None if args.smoke else args.results / f"holdout_{name}.runs.jsonl")
    every_run = {}  # id -> RunResult: every run this invocation used, for its cost
    checkpoints = config[f"{TASK}_checkpoints"]

    def runs(methods: list[str], seeds: int, lr: float = SHARED_RATE, task_context=context, split: str = "test",
             checkpoints: tuple[int, ...] = checkpoints, label: str = LABEL):  # fmt: skip
        found = run_methods(task_context, methods, seeds, setup.epoch, lr, setup.evaluators[split], checkpoints,
                            label, log, build=build)  # fmt: skip
        every_run.update((id(result), result) for result in found)  # a run read back twice is one object
        return found

    def regime_check(lr: float) -> dict:
        regime_runs = runs(list(REGIME_ARMS), config["regime_seeds"], lr)
        by_rank = [np.array([r.metrics[setup.primary] for r in sorted(regime_runs, key=lambda r: r.seed)
                             if r.method == arm]) for arm in REGIME_ARMS]  # fmt: skip
        return {**regime.verdict(LABEL, *by_rank, setup.primary), "lr": lr}

    uniform = confirm.baseline(context.avg_rank)
    main_runs = runs([uniform, *CANDIDATES], config["seeds"])
    verdict = regime_check(SHARED_RATE)
    rows, contrasts = confirm.summarise(main_runs, uniform, setup.primary, family=FAMILY, diagnostics=[])
    confirm.tag(rows, contrasts, LABEL, setup.primary)
    long_config = {**config, f"{TASK}_steps": config["long_steps"], f"{TASK}_checkpoints": config["long_checkpoints"]}
    long_context = regime.task_context(TASK, setup, long_config)
    long_context.allocations = context.allocations
    long_label = f"{LABEL}, {config['long_steps']} steps"
    long_runs = runs([uniform, tuned_lr.SHIPPED], config["long_seeds"], task_context=long_context,
                     checkpoints=config["long_checkpoints"], label=long_label)  # fmt: skip
    long_rows, long_contrasts = confirm.summarise(long_runs, uniform, setup.primary, family=[],
                                                  diagnostics=[(tuned_lr.SHIPPED, confirm.UNIFORM)])  # fmt: skip
    confirm.tag(long_rows, long_contrasts, long_label, setup.primary)
    for row in long_rows:  # the metric at every checkpoint, mean over the seeds: where each arm is going
        row["curve"] = {
            step: float(np.mean([r.curve[step][setup.primary] for r in long_runs if r.method == row["method"]]))
            for step in config["long_checkpoints"]
        }

    def dev_metric(arm: str, rate: float) -> float:  # the mean over the search's seeds, at the last step only
        found = runs([arm], config["search_seeds"], rate, split="dev", checkpoints=(context.steps,),
                     label=f"{LABEL} dev")  # fmt: skip
        return float(np.mean([r.metrics[setup.primary] for r in found]))

    scores = {arm: tuned_lr.search(lambda rate, arm=arm: dev_metric(arm, rate), SEARCH_RATES)
              for arm in (uniform, *CANDIDATES)}  # fmt: skip
    rates = {arm: tuned_lr.chosen_rate(s) for arm, s in scores.items()}
    searched_runs = [result for arm, rate in rates.items() for result in runs([arm], config["seeds"], rate)]
    searched_rows, searched_contrasts = confirm.summarise(searched_runs, uniform, setup.primary, family=FAMILY,
                                                          diagnostics=[])  # fmt: skip
    if rates[tuned_lr.SHIPPED] != rates[uniform]:  # each at the other's rate, paired with it there
        shipped, uniform_runs = ([r for r in searched_runs if r.method == arm] for arm in (tuned_lr.SHIPPED, uniform))
        at_shipped_rate = tuned_lr.same_rate_contrast(
            tuned_lr.SHIPPED, shipped, runs([uniform], config["seeds"], rates[tuned_lr.SHIPPED]), setup.primary
        )
        at_uniform_rate = tuned_lr.same_rate_contrast(
            tuned_lr.SHIPPED,
            runs([tuned_lr.SHIPPED], config["seeds"], rates[uniform]),
            uniform_runs,
            setup.primary,
            f"{tuned_lr.SHIPPED} at uniform LoRA's rate vs uniform LoRA",
        )
        searched_contrasts += [{**at_shipped_rate, "lr": rates[tuned_lr.SHIPPED]},
                               {**at_uniform_rate, "lr": rates[uniform]}]  # fmt: skip
    searched_verdict = regime_check(rates[uniform])
    for item in (*searched_rows, *searched_contrasts):
        item["rates"] = SEARCHED
    for row in searched_rows:
        row["lr"] = rates[row["method"]]
    confirm.tag(searched_rows, searched_contrasts, f"{LABEL}, {SEARCHED}", setup.primary)
    standing_label = f"{LABEL}, every arm at {rates[uniform]:g}"
    standing_rows, standing_contrasts = confirm.summarise(
        runs([uniform, "paper-rs", *STANDING], config["seeds"], rates[uniform]), uniform, setup.primary, family=[],
        diagnostics=[*((arm, confirm.UNIFORM) for arm in STANDING), ("paper-rs", "shuffled-rs")])  # fmt: skip
    confirm.tag(standing_rows, standing_contrasts, standing_label, setup.primary)
    decision = {"shipped_default": tuned_lr.SHIPPED, "holds_at_the_shared_rate": holds(contrasts),
                "holds_at_rates_searched_on_dev": holds(searched_contrasts)}  # fmt: skip
    decision["shipped_default_holds"] = (
        decision["holds_at_the_shared_rate"] and decision["holds_at_rates_searched_on_dev"]
    )
    trained = sum(r.curve[max(r.curve)]["seconds"] for r in every_run.values())
    searched = {"dev_scores": {arm: {str(r): v for r, v in sorted(s.items())} for arm, s in scores.items()},
                "rates": rates, "metric": setup.primary, "regime": searched_verdict,
                "scored_on": f"mean of seeds 0-{config['search_seeds'] - 1}", "rows": searched_rows,
                "contrasts": searched_contrasts}  # fmt: skip
    standing = {"lr": rates[uniform], "rows": standing_rows, "contrasts": standing_contrasts}
    cost = {
        "seconds_this_invocation": round(time.perf_counter() - started, 1),
        "training_seconds_logged": round(trained, 1),
    }
    env = {**environment(device), "config": name, "settings": config, "regime": verdict, "contrasts": contrasts,
           "decision": decision, "setup": setup.record, "long": {"rows": long_rows, "contrasts": long_contrasts},
           "searched": searched, "standing": standing, "cost": cost}  # fmt: skip
    write_results(f"holdout_{name}", env, rows, args.results)
    every_contrast = [*contrasts, *long_contrasts, *searched_contrasts, *standing_contrasts]
    same_rate = [c for c in every_contrast if c["baseline"] == tuned_lr.SAME_RATE]  # drawn beside the others
    plotted = [c for c in every_contrast if c not in same_rate] + [
        {**c, "baseline": confirm.UNIFORM, "method": f"{c['method']}, both at {c['lr']:g}"} for c in same_rate
    ]
    confirm.plot(plotted, {"default": tuned_lr.SHIPPED}, args.results / f"holdout_{name}.png")
    tuned_lr.plot({f"{LABEL}: dev search": searched}, args.results / f"holdout_{name}_rates.png")
    for check in (verdict, searched_verdict):
        print(f"{LABEL} at {check['lr']:g}: {check['contrast']} = {check['gain']:+.4f}, ratio {check['ratio']:.1f} -> "
              f"{'PASS' if check['passes'] else 'fail'}")  # fmt: skip
    print(f"rates chosen on dev: {rates}")
    confirm.print_contrasts(every_contrast)
    print(f"shipped default ({tuned_lr.SHIPPED}) holds: {decision}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
