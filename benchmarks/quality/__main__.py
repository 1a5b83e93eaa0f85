"""The whole quality suite, in the order its parts depend on each other (each resumes from its run log):

    python -m benchmarks.quality            # regime -> screen -> confirmation -> tuned rates -> held-out task
                                            #   -> comparison -> cost
    python -m benchmarks.quality --smoke    # every part's harness (about 16 min on 2 CPU cores)

1. ``regime``: which task/model pairs can show an allocation effect at all;
2. ``screen``: which allocation rules hold most of a fully fine-tuned teacher's update (no training of them);
3. ``confirm``: the rules worth training, with rsLoRA scaling, against uniform LoRA where the regime passes;
4. ``tuned_lr``: the confirmation's main arms each at its own learning rate, chosen on a dev split;
5. ``holdout``: the shipped default against uniform LoRA on a task that played no part in choosing it;
6. ``run_quality``: the method comparison whose rule chose the default (``AllocationConfig()``);
7. ``cost``: what every run log's training took, per log, task and learning rate (no training).
Options after the first (``--results DIR``, ``--threads N``, ``--smoke``) go to every part.
"""

from __future__ import annotations

import sys

from benchmarks.quality import confirm, cost, holdout, regime, run_quality, screen, tuned_lr

PARTS = (("regime check", regime.main), ("teacher screen", screen.main), ("confirmation", confirm.main),
         ("tuned learning rates", tuned_lr.main), ("held-out task", holdout.main),
         ("method comparison", run_quality.main),
         ("cost from the run logs", cost.main))  # fmt: skip


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        return 0
    for name, part in PARTS:
        print(f"== {name} ==", flush=True)
        code = part(list(argv))
        if code:
            return code
    return 0


if __name__ == "__main__":
    sys.exit(main())
