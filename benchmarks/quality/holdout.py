"""Does the shipped default hold on a task that played no part in choosing it?

    python -m benchmarks.quality.holdout            # the CPU configuration (about 4 h on 2 cores)
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
- Equal parameters (a diagnostic, added on 2026-12-07 in the session after the standing arms, before any run
  of its own): EVA's ranks beat uniform LoRA at 2e-3 with 8 % more parameters. EQUAL_PARAMS: EVA's rule at
  uniform LoRA's parameters (``eva_params``: the same explained-variance order, units taken only while the
  parameters fit; LoRA's initialisation, rsLoRA) and sensilora's data-free structural prior
  (``rule="structural"``: theta = depth + 1, rsLoRA; its ranks rise with depth, as EVA's do here), at uniform
  LoRA's searched rate over SEEDS seeds. Contrasts, each on its own, paired by seed: each against uniform
  LoRA (does EVA's lead survive at equal parameters; does depth alone carry it), EVA's ranks against EVA's
  rule at equal parameters (what the extra parameters buy), and the shipped default against EVA's rule at
  equal parameters (the product's claim against EVA). Outside the decision.
Every run is logged as it ends (``holdout_<config>.runs.jsonl``): a later invocation resumes.
"""

from __future__ import annotations

import sys
import time

import numpy as np
import torch

from benchmarks.common import environment, write_results
from benchmarks.quality import confirm, eva_params, regime, tuned_lr
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
STANDING_CONTRASTS = [*((arm, confirm.UNIFORM) for arm in STANDING), ("paper-rs", "shuffled-rs")]
EQUAL_PARAMS = (confirm.EVA_PARAMS, confirm.STRUCTURAL)  # EVA's rule at uniform LoRA's parameters, the structural prior
EQUAL_PARAMS_CONTRASTS = [*((arm, confirm.UNIFORM) for arm in EQUAL_PARAMS), (confirm.EVA, confirm.EVA_PARAMS),
                          (tuned_lr.SHIPPED, confirm.EVA_PARAMS)]  # fmt: skip
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


class Runner:
    """The held-out task's runs, each read back from the run log or trained and logged: every part below
    asks it for (arms, seeds, rate) and gets the RunResults; it remembers every run it handed out, for the
    invocation's cost."""

    def __init__(self, setup, context, config: dict, log: RunLog):
        self.setup, self.context, self.config, self.log = setup, context, config, log
        self.arms = confirm.build(setup, context, context.allocations)
        self.every_run = {}  # id -> RunResult (a run read back twice is one object)

    def build(self, method: str, context, seed: int):
        if method in regime.METHODS:  # uniform LoRA (rsLoRA) at a rank, alpha for the task's average rank
            return regime.uniform_rslora(self.setup, regime.METHODS[method], self.context.avg_rank), None
        return self.arms(method, context, seed)

    def __call__(self, methods: list[str], seeds: int, lr: float = SHARED_RATE, context=None, split: str = "test",
                 checkpoints: tuple[int, ...] | None = None, label: str = LABEL) -> list:  # fmt: skip
        found = run_methods(context or self.context, methods, seeds, self.setup.epoch, lr,
                            self.setup.evaluators[split], checkpoints or self.config[f"{TASK}_checkpoints"], label,
                            self.log, build=self.build)  # fmt: skip
        self.every_run.update((id(result), result) for result in found)
        return found

    def regime_check(self, lr: float) -> dict:
        """The regime check's verdict (``regime.verdict``) at ``lr``: uniform LoRA at r = 1 against r = 8."""
        found = sorted(self(list(REGIME_ARMS), self.config["regime_seeds"], lr), key=lambda r: r.seed)
        by_rank = [np.array([r.metrics[self.setup.primary] for r in found if r.method == arm]) for arm in REGIME_ARMS]
        return {**regime.verdict(LABEL, *by_rank, self.setup.primary), "lr": lr}

    def dev_metric(self, arm: str, rate: float) -> float:
        """``arm``'s dev metric at ``rate``: the mean over the search's seeds, at the last step only."""
        found = self([arm], self.config["search_seeds"], rate, split="dev", checkpoints=(self.context.steps,),
                     label=f"{LABEL} dev")  # fmt: skip
        return float(np.mean([r.metrics[self.setup.primary] for r in found]))


def at_the_shared_rate(run: Runner, uniform: str) -> tuple[list[dict], list[dict]]:
    """Rows and the Holm family's contrasts, every arm at SHARED_RATE."""
    rows, contrasts = confirm.summarise(run([uniform, *CANDIDATES], run.config["seeds"]), uniform, run.setup.primary,
                                        family=FAMILY, diagnostics=[])  # fmt: skip
    confirm.tag(rows, contrasts, LABEL, run.setup.primary)
    return rows, contrasts


def trained_longer(run: Runner, uniform: str) -> dict:
    """Uniform LoRA and the default trained ``long_steps`` steps: rows (with each arm's mean curve) and the
    paired contrast."""
    config, primary = run.config, run.setup.primary
    long_config = {**config, f"{TASK}_steps": config["long_steps"], f"{TASK}_checkpoints": config["long_checkpoints"]}
    context = regime.task_context(TASK, run.setup, long_config)
    context.allocations = run.context.allocations
    label = f"{LABEL}, {config['long_steps']} steps"
    found = run([uniform, tuned_lr.SHIPPED], config["long_seeds"], context=context,
                checkpoints=config["long_checkpoints"], label=label)  # fmt: skip
    rows, contrasts = confirm.summarise(found, uniform, primary, family=[],
                                        diagnostics=[(tuned_lr.SHIPPED, confirm.UNIFORM)])  # fmt: skip
    confirm.tag(rows, contrasts, label, primary)
    for row in rows:  # the metric at every checkpoint, mean over the seeds: where each arm is going
        row["curve"] = {step: float(np.mean([r.curve[step][primary] for r in found if r.method == row["method"]]))
                        for step in config["long_checkpoints"]}  # fmt: skip
    return {"rows": rows, "contrasts": contrasts}


def at_rates_searched_on_dev(run: Runner, uniform: str) -> dict:
    """Each arm's rate searched on dev, its test runs there, the Holm family, the same-rate diagnostics and
    the regime check at uniform LoRA's rate."""
    seeds, primary = run.config["seeds"], run.setup.primary
    scores = {arm: tuned_lr.search(lambda rate, arm=arm: run.dev_metric(arm, rate), SEARCH_RATES)
              for arm in (uniform, *CANDIDATES)}  # fmt: skip
    rates = {arm: tuned_lr.chosen_rate(s) for arm, s in scores.items()}
    found = [result for arm, rate in rates.items() for result in run([arm], seeds, rate)]
    rows, contrasts = confirm.summarise(found, uniform, primary, family=FAMILY, diagnostics=[])
    if rates[tuned_lr.SHIPPED] != rates[uniform]:  # each at the other's rate, paired with it there
        shipped, uniform_runs = ([r for r in found if r.method == arm] for arm in (tuned_lr.SHIPPED, uniform))
        at_shipped_rate = tuned_lr.same_rate_contrast(
            tuned_lr.SHIPPED, shipped, run([uniform], seeds, rates[tuned_lr.SHIPPED]), primary
        )
        at_uniform_rate = tuned_lr.same_rate_contrast(
            tuned_lr.SHIPPED, run([tuned_lr.SHIPPED], seeds, rates[uniform]), uniform_runs, primary,
            f"{tuned_lr.SHIPPED} at uniform LoRA's rate vs uniform LoRA",
        )  # fmt: skip
        contrasts += [{**at_shipped_rate, "lr": rates[tuned_lr.SHIPPED]}, {**at_uniform_rate, "lr": rates[uniform]}]
    verdict = run.regime_check(rates[uniform])
    for item in (*rows, *contrasts):
        item["rates"] = SEARCHED
    for row in rows:
        row["lr"] = rates[row["method"]]
    confirm.tag(rows, contrasts, f"{LABEL}, {SEARCHED}", primary)
    return {"dev_scores": {arm: {str(r): v for r, v in sorted(s.items())} for arm, s in scores.items()},
            "rates": rates, "metric": primary, "regime": verdict,
            "scored_on": f"mean of seeds 0-{run.config['search_seeds'] - 1}", "rows": rows,
            "contrasts": contrasts}  # fmt: skip


def diagnostic_arms(run: Runner, uniform: str, arms: tuple[str, ...], pairs: list, rate: float) -> dict:
    """``arms`` beside uniform LoRA at ``rate`` over SEEDS seeds: rows and the ``pairs`` (method, baseline;
    UNIFORM for uniform LoRA) among them, each contrast on its own."""
    found = run([uniform, *arms], run.config["seeds"], rate)
    rows, contrasts = confirm.summarise(found, uniform, run.setup.primary, family=[], diagnostics=pairs)
    confirm.tag(rows, contrasts, f"{LABEL}, every arm at {rate:g}", run.setup.primary)
    return {"lr": rate, "rows": rows, "contrasts": contrasts}


def add_equal_params_arms(context, calibration) -> None:
    """EQUAL_PARAMS' allocations into ``context.allocations`` (their ranks key their runs in the log)."""
    context.allocations[confirm.EVA_PARAMS] = eva_params.allocation(context, calibration)
    context.allocations[confirm.STRUCTURAL] = confirm.structural_allocation(context)


def main(argv=None) -> int:
    args = parse(__doc__, argv)
    name = "smoke" if args.smoke else "cpu"
    config, device = CONFIGS[name], torch.device("cpu")
    started = time.perf_counter()
    setup = topic_distill_setup(config, device)
    context = regime.task_context(TASK, setup, config)
    context.allocations = confirm.candidate_allocations(context, setup.calibration)
    add_equal_params_arms(context, setup.calibration)
    run = Runner(setup, context, config, RunLog(None if args.smoke else args.results / f"holdout_{name}.runs.jsonl"))
    uniform = confirm.baseline(context.avg_rank)
    rows, contrasts = at_the_shared_rate(run, uniform)
    verdict = run.regime_check(SHARED_RATE)
    long = trained_longer(run, uniform)
    searched = at_rates_searched_on_dev(run, uniform)
    rate = searched["rates"][uniform]
    standing = diagnostic_arms(run, uniform, ("paper-rs", *STANDING), STANDING_CONTRASTS, rate)
    equal_params = diagnostic_arms(run, uniform, (*EQUAL_PARAMS, confirm.EVA, tuned_lr.SHIPPED), EQUAL_PARAMS_CONTRASTS,
                                   rate)  # fmt: skip
    equal_params["ranks"] = {arm: context.allocations[arm].ranks for arm in EQUAL_PARAMS}
    decision = {"shipped_default": tuned_lr.SHIPPED, "holds_at_the_shared_rate": holds(contrasts),
                "holds_at_rates_searched_on_dev": holds(searched["contrasts"])}  # fmt: skip
    decision["shipped_default_holds"] = (
        decision["holds_at_the_shared_rate"] and decision["holds_at_rates_searched_on_dev"]
    )
    trained = sum(r.curve[max(r.curve)]["seconds"] for r in run.every_run.values())
    cost = {"seconds_this_invocation": round(time.perf_counter() - started, 1),
            "training_seconds_logged": round(trained, 1)}  # fmt: skip
    env = {**environment(device), "config": name, "settings": config, "regime": verdict, "contrasts": contrasts,
           "decision": decision, "setup": setup.record, "long": long, "searched": searched, "standing": standing,
           "equal_params": equal_params, "cost": cost}  # fmt: skip
    write_results(f"holdout_{name}", env, rows, args.results)
    every_contrast = [*contrasts, *long["contrasts"], *searched["contrasts"], *standing["contrasts"],
                      *equal_params["contrasts"]]  # fmt: skip
    plot(every_contrast, searched, args.results, name)
    for check in (verdict, searched["regime"]):
        print(f"{LABEL} at {check['lr']:g}: {check['contrast']} = {check['gain']:+.4f}, ratio {check['ratio']:.1f} -> "
              f"{'PASS' if check['passes'] else 'fail'}")  # fmt: skip
    print(f"rates chosen on dev: {searched['rates']}")
    confirm.print_contrasts(every_contrast)
    print(f"shipped default ({tuned_lr.SHIPPED}) holds: {decision}")
    return 0


def plot(every_contrast: list[dict], searched: dict, results, name: str) -> None:
    """The contrasts (the same-rate diagnostics drawn beside the others, labelled with their rate) and the
    dev search."""
    same_rate = [c for c in every_contrast if c["baseline"] == tuned_lr.SAME_RATE]
    plotted = [c for c in every_contrast if c not in same_rate] + [
        {**c, "baseline": confirm.UNIFORM, "method": f"{c['method']}, both at {c['lr']:g}"} for c in same_rate
    ]
    confirm.plot(plotted, {"default": tuned_lr.SHIPPED}, results / f"holdout_{name}.png")
    tuned_lr.plot({f"{LABEL}: dev search": searched}, results / f"holdout_{name}_rates.png")


if __name__ == "__main__":
    sys.exit(main())
