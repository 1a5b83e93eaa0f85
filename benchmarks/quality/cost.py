"""What the quality suite cost to run, read from its run logs: training time per log, task and learning rate.

    python -m benchmarks.quality.cost           # benchmarks/results/*_cpu.runs.jsonl -> quality_cost_cpu.{json,csv}

Every training run of the suite is appended to a run log as it ends, with its wall time (``seconds`` at its
last checkpoint: training and its held-out evaluations, on the machine that ran it). This sums them per log,
task and learning rate, so the cost of rerunning a part from scratch is read off the logs, not remembered.
A part's runs can sit in another part's log: the per-arm learning rates (``tuned_lr``) log uniform LoRA's
test runs in the regime check's log and the candidates' in the confirmation's, at rates other than 1e-3.
Not in any log: building a task (training a distillation teacher, calibrating, EVA's SVDs), a few minutes a
task, and the screen, which trains no student.
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path

import torch

from benchmarks.common import environment, write_results
from benchmarks.quality.options import parse

SUFFIX = ".runs.jsonl"


def logged_costs(paths: list[Path]) -> list[dict]:
    """One row per (log, task label, learning rate): runs, their total seconds (each run's
    ``metrics["seconds"]``) and minutes per run; a log's name is its file's name before ``SUFFIX``."""
    # read line by line, not through run_quality.RunLog: RunLog keeps one run per key (the one a resume
    # reuses), while the cost is every run that was trained, a superseded one included
    totals = defaultdict(lambda: [0, 0.0])
    for path in paths:
        for line in path.read_text(encoding="utf-8").splitlines():
            record = json.loads(line)
            total = totals[(path.name.removesuffix(SUFFIX), record["label"], record["lr"])]
            total[0] += 1
            total[1] += record["metrics"]["seconds"]
    return [
        {"log": log, "task": task, "lr": lr, "runs": runs, "seconds": round(seconds),
         "minutes_per_run": round(seconds / 60 / runs, 2)}
        for (log, task, lr), (runs, seconds) in sorted(totals.items())
    ]  # fmt: skip


def main(argv=None) -> int:
    args = parse(__doc__, argv)
    name = "smoke" if args.smoke else "cpu"  # smoke runs keep no logs: an empty table checks the harness
    rows = logged_costs(sorted(Path(args.results).glob(f"*_{name}{SUFFIX}")))
    by_task, by_log = defaultdict(lambda: [0, 0.0]), defaultdict(float)  # runs and minutes; minutes
    for row in rows:
        by_task[(row["log"], row["task"])][0] += row["runs"]
        by_task[(row["log"], row["task"])][1] += row["seconds"] / 60
        by_log[row["log"]] += row["seconds"] / 60
    total = sum(by_log.values())
    env = {**environment(torch.device("cpu")), "config": name, "minutes_by_log": {k: round(v, 1) for k, v in
           by_log.items()}, "minutes": round(total, 1)}  # fmt: skip
    write_results(f"quality_cost_{name}", env, rows, args.results)
    for (log, task), (runs, minutes) in by_task.items():  # the rates apart: the CSV
        print(f"{log:<14} {task:<56} {runs:>4} runs {minutes:>7.1f} min ({minutes / runs:.2f} a run)")
    if not rows:
        print(f"no *_{name}{SUFFIX} run logs in {args.results}: nothing to sum")
    else:
        print(", ".join(f"{log} {m / 60:.1f} h" for log, m in by_log.items()) + f"; in all {total / 60:.1f} h")
    return 0


if __name__ == "__main__":
    sys.exit(main())
