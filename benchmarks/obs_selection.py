"""obs-mode selection over every SmolLM2-135M target matrix: the CPU backend against the sorting reference,
timed one after the other in one process (the selections alone; the inverse diagonals are random, since
their values do not change the work).

    python -m benchmarks.obs_selection [--results DIR]     # -> obs_selection_cpu.{json,csv}
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from sensilora.calibration.models import load_model
from sensilora.calibration.targets import find_targets
from sensilora.ops import reference

from benchmarks.common import RESULTS, environment, markdown_table, write_results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    from sensilora_kernels import cpu

    model, _, _ = load_model(progress=False)
    generator = torch.Generator().manual_seed(0)
    pairs = [
        (module.weight.detach(), torch.rand(module.weight.shape[1], generator=generator) + 0.01)
        for module in find_targets(model).values()
    ]
    rows, results = [], {}
    for name, select in (("cpu", cpu.saliency_topk_mean_and_effective_rank),
                         ("torch reference (sort)", reference.saliency_topk_mean_and_effective_rank)):  # fmt: skip
        start = time.perf_counter()
        results[name] = [select(weight, inverse, 0.5, 0.85) for weight, inverse in pairs]
        rows.append({"backend": name, "matrices": len(pairs), "saliencies": sum(w.numel() for w, _ in pairs),
                     "seconds": round(time.perf_counter() - start, 3)})  # fmt: skip
    rows[0]["vs_reference"] = round(rows[1]["seconds"] / rows[0]["seconds"], 1)
    rows[0]["ranks_equal"] = all(
        torch.equal(a[2], b[2]) for a, b in zip(results["cpu"], results["torch reference (sort)"])
    )
    write_results("obs_selection_cpu", environment(torch.device("cpu")), rows, args.results)
    print(markdown_table(rows, list(rows[0])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
