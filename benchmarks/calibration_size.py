"""How much calibration text is enough? Allocations from two disjoint samples of N tokens, compared.

    python -m benchmarks.calibration_size        # SmolLM2-135M on KJV text, a minute on 2 CPU cores

For each token count N, two calibrations on disjoint KJV windows (different seeds draw different
documents) give two allocations (diag, avg rank 8, parameter budget); their Spearman correlation of theta
and largest rank difference say how far the result still depends on which text was drawn. The smallest N
whose two samples agree (Spearman >= 0.9) justifies sensilora.calibration.text.MIN_CALIBRATION_TOKENS.
Writes benchmarks/results/calibration_size_cpu.{json,csv}.
"""

from __future__ import annotations

import sys

import sensilora
from sensilora.calibration.models import load_model
from sensilora.calibration.text import calibration_batches, default_calibration_file, read_texts
from sensilora.integrations.compare import compare_allocations

from benchmarks.common import environment, markdown_table, write_results

TOKENS = (32, 128, 512, 2048, 8192)


def main() -> int:
    model, tokenizer, name = load_model(progress=False)
    documents = read_texts(default_calibration_file())
    half = len(documents) // 2
    rows = []
    for tokens in TOKENS:
        seq_len = min(256, tokens)
        allocations = []
        for part, docs in enumerate((documents[:half], documents[half:])):  # disjoint halves of the Bible
            batches = calibration_batches(tokenizer, docs, tokens // seq_len, seq_len, 8, seed=part, minimum=1)
            stats = sensilora.calibrate(model, batches, progress=False)
            allocations.append(sensilora.allocate(stats, avg_rank=8, budget="params"))
        result = compare_allocations(*allocations)
        rows.append({
            "tokens": tokens, "seq_len": seq_len, "spearman_theta": result["spearman_theta"],
            "max_rank_difference": result["max_abs_rank_difference"],
            "mean_rank_difference": result["mean_abs_rank_difference"],
            "modules_differing": result["modules_differing"],
        })  # fmt: skip
    write_results("calibration_size_cpu", {**environment(model.device), "model": name}, rows)
    print(markdown_table(rows, list(rows[0])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
