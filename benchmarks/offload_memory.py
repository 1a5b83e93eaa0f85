"""Peak memory of calibrating a model loaded whole, layer by layer (``sequential``, its device the CPU), and
offloaded to disk by accelerate (``device_map``), each in a fresh process, on the CPU: what "a model larger
than memory" costs here.

    python -m benchmarks.offload_memory [--layers 16] [--hidden 1024] [--results DIR]

A random-weight LLaMA-style model (timing and memory only, never quality) is saved once; each mode then
loads it in its own process, calibrates the same batches (diag mode) and reports its peak resident set
(VmHWM), the calibration seconds and the statistics, which must equal the whole model's (fp32 summation order
aside). Results:
``offload_memory_cpu.{json,csv}``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from benchmarks.common import RESULTS, environment, markdown_table, write_results

# mode -> (accelerate device_map or None, calibrate keyword arguments)
MODES = {
    "whole": (None, {}),
    "sequential (device = cpu)": (None, {"sequential": True, "device": "cpu"}),
    "disk offload": ({"": "disk"}, {}),
}


def child(directory: str, mode: str, out: str) -> None:
    """One measurement, in this (fresh) process: load, calibrate, write stats and peak memory."""
    import time

    import sensilora
    from transformers import LlamaForCausalLM

    from benchmarks.quality.train import peak_rss_gib
    from tests.models import random_batches

    device_map, options = MODES[mode]
    extra = {} if device_map is None else {"device_map": device_map, "offload_folder": tempfile.mkdtemp()}
    model = LlamaForCausalLM.from_pretrained(directory, **extra)
    batches = random_batches(4, batch_size=2, seq_len=128, vocab=model.config.vocab_size)
    start = time.perf_counter()
    stats = sensilora.calibrate(model, batches, progress=False, **options)
    seconds = time.perf_counter() - start
    stats.save(out)
    Path(out + ".json").write_text(json.dumps({"peak_rss_gib": peak_rss_gib(), "seconds": seconds}))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(*args.child)
        return 0
    from sensilora.calibration.stats import SensitivityStats
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=32000, hidden_size=args.hidden, intermediate_size=4 * args.hidden,
                         num_hidden_layers=args.layers, num_attention_heads=16, num_key_value_heads=4)  # fmt: skip
    rows, stats = [], {}
    with tempfile.TemporaryDirectory() as work:
        torch.manual_seed(0)
        model = LlamaForCausalLM(config)
        parameters = sum(p.numel() for p in model.parameters())
        model.save_pretrained(Path(work) / "model")
        del model
        for mode in MODES:
            out = str(Path(work) / f"{mode}.safetensors")
            command = [
                sys.executable,
                "-m",
                "benchmarks.offload_memory",
                "--child",
                str(Path(work) / "model"),
                mode,
                out,
            ]
            subprocess.run(command, check=True, cwd=Path(__file__).resolve().parent.parent)
            measured = json.loads(Path(out + ".json").read_text())
            stats[mode] = SensitivityStats.load(out)
            rows.append({"mode": mode, "parameters": parameters, "weights_gib": round(parameters * 4 / 2**30, 2),
                         "peak_rss_gib": round(measured["peak_rss_gib"], 2),
                         "calibration_s": round(measured["seconds"], 2)})  # fmt: skip
    whole = stats["whole"]
    for row in rows:
        other = stats[row["mode"]]
        row["stats_max_rel_diff"] = max(
            float(((other.inputs[k].hessian_diag - v.hessian_diag).abs() / v.hessian_diag.abs().clamp_min(1e-30)).max())
            for k, v in whole.inputs.items()
        )
    equal = all(row["stats_max_rel_diff"] < 1e-5 for row in rows)
    write_results("offload_memory_cpu", environment(torch.device("cpu")), rows, args.results)
    print(markdown_table(rows, list(rows[0])))
    return 0 if equal else 1


if __name__ == "__main__":
    sys.exit(main())
