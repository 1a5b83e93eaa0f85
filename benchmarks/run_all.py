"""Run every benchmark that this machine can run; write benchmarks/results/<device>.{json,csv} and a plot.

python -m benchmarks.run_all            # CPU scale here (a few minutes on 2 cores); GPU scale on CUDA
python -m benchmarks.run_all --quick    # smaller sizes, for a smoke run
python -m benchmarks.run_all --part 1   # on a GPU: the rows that matter most (bounds, 8B end to end, per op);
                                        # --part 2 the rest (8B at 128 sequences, the naive baseline)
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path

import torch
from sensilora.io import write_with_atomic

from benchmarks import roofline
from benchmarks.cases import end_to_end, naive_vs_sensilora, per_op
from benchmarks.common import RESULTS, environment, markdown_table, write_results


def smollm2_batches(tokenizer, sequences: int, seq_len: int):
    from sensilora.calibration.text import calibration_batches, default_calibration_file, read_texts

    return calibration_batches(tokenizer, read_texts(default_calibration_file()), sequences, seq_len, batch_size=8)


def llama8b(device):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(  # LLaMA-3.1-8B's shape, random weights: timing only
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        max_position_embeddings=8192,
        rope_theta=500000.0,
    )
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    return model.eval()


def overhead_plot(rows: list[dict], path: Path, device_name: str) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6.4, 4), constrained_layout=True)
    FigureCanvasAgg(figure)
    axis = figure.subplots()
    for mode, marker in (("diag", "o"), ("obs", "s")):
        points = sorted((r["tokens"], 100 * r["overhead"]) for r in rows if r.get("stage") == f"calibrate {mode}")
        if points:
            axis.plot(*zip(*points), marker=marker, label=f"calibrate({mode!r})")
    axis.axhline(5, color="grey", linestyle=":", label="diag target (5%)")
    axis.set_xscale("log", base=2)
    axis.set_xlabel("calibration tokens")
    axis.set_ylabel("overhead over the bare forward (%)")
    axis.set_title(f"Statistics overhead, {device_name}", fontsize=10)
    axis.legend()
    write_with_atomic(path, lambda tmp: figure.savefig(tmp, format="png", dpi=110))


def sections(device: torch.device, quick: bool, tiny: bool):
    """(part, name, function returning rows) in the order they run: each is written out as soon as it ends.
    On a GPU part 1 holds the rows that matter most, part 2 the rest (one lease may not fit both)."""
    yield 1, "H100 bounds", lambda: [{"case": f"H100 SXM bound: {r.pop('op')}", **r} for r in roofline.bounds()]
    if tiny:  # the whole pipeline at toy sizes: checks the script, measures nothing worth reporting
        from tests.models import random_batches, tiny_llama

        yield 1, "naive", lambda: naive_vs_sensilora(device, columns=(64,), tokens=128)
        yield 1, "per-op", lambda: per_op(device, columns=(64,), batch=1, seq=128, dtype=torch.float32)
        model = tiny_llama().to(device)
        yield 1, "end-to-end", lambda: end_to_end(model, random_batches(), device, "tiny LLaMA (random)", 54)
    elif device.type == "cuda":
        model = llama8b(device)
        for sequences in (32,) if quick else (32, 128):
            ids = torch.randint(0, 128256, (sequences, 2048), device=device)
            batches = [{"input_ids": ids[i : i + 8], "attention_mask": torch.ones_like(ids[i : i + 8])}
                       for i in range(0, sequences, 8)]  # fmt: skip
            label = "LLaMA-3.1-8B shape (random bf16)"
            yield (
                1 if sequences == 32 else 2,
                f"end-to-end {sequences}",
                lambda b=batches, n=sequences: end_to_end(model, b, device, label, n * 2048),
            )
            if sequences == 32:
                yield 1, "per-op", lambda: per_op(device)
        yield 2, "naive", lambda: naive_vs_sensilora(device)
    else:
        columns = (256, 512, 1024) if quick else (256, 512, 1024, 2048, 4096)
        yield 1, "naive", lambda: naive_vs_sensilora(device, columns=columns, tokens=2048)
        yield 1, "per-op", lambda: per_op(device, columns=(576, 1536), batch=1, seq=2048, dtype=torch.float32)
        from sensilora.calibration.models import load_model

        model, tokenizer, _ = load_model(progress=False)
        for sequences, seq_len in ((2, 256), (4, 256)) if quick else ((2, 256), (4, 256), (8, 256), (16, 256)):
            batches = smollm2_batches(tokenizer, sequences, seq_len)
            yield (
                1,
                f"end-to-end {sequences}",
                lambda b=batches, n=sequences * seq_len: end_to_end(model, b, device, "SmolLM2-135M (fp32)", n),
            )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller sizes")
    parser.add_argument("--tiny", action="store_true", help="toy sizes: checks the script end to end in seconds")
    parser.add_argument("--part", choices=["1", "2", "all"], default="all", help="which sections (GPU: 1 first)")
    parser.add_argument("--results", type=Path, default=RESULTS, help="output folder (default benchmarks/results)")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    env = environment(device)
    print(f"device: {env['device']}  torch {env['torch']}  triton {env['triton']}  commit {env['commit']}")
    stem = "cpu" if device.type == "cpu" else re.sub(r"[^A-Za-z0-9]+", "-", env["device"]).strip("-").lower()
    stem += "_tiny" if args.tiny else ""
    stem += "" if args.part == "all" else f"_part{args.part}"
    rows, json_path, csv_path = [], None, None
    for part, name, run in sections(device, args.quick, args.tiny):
        if args.part != "all" and str(part) != args.part:
            continue
        started = time.perf_counter()
        rows += run()
        json_path, csv_path = write_results(stem, env, rows, args.results)  # every section lands as it ends
        print(f"[{name}] done in {time.perf_counter() - started:.1f} s; {len(rows)} rows in {json_path}", flush=True)
    if not rows:
        print(f"part {args.part} has no section on this device")
        return 0
    overhead_plot(rows, args.results / f"{stem}_overhead.png", env["device"])
    for case in dict.fromkeys(r["case"] for r in rows):
        subset = [r for r in rows if r["case"] == case]
        columns = [c for c in dict.fromkeys(k for r in subset for k in r) if c != "case"]
        print(f"\n### {case}\n" + markdown_table(subset, columns))
    print(f"\nwrote {json_path}, {csv_path} and {args.results / (stem + '_overhead.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
