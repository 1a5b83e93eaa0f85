"""``sensilora allocate``: validate everything cheap first, calibrate (or reuse saved statistics), allocate,
render, then commit every output at once."""

from __future__ import annotations

import sys

from . import allocate, calibrate
from .allocation import check_budget_fits, per_metric_ranks
from .calibration import check_calibration_options
from .config import AllocationConfig
from .data import calibration_batches, default_calibration_file, file_sha256, read_texts
from .distributed import join_torchrun
from .errors import SensiloraError
from .io import check_output_paths, commit_outputs
from .models import load_model
from .plots import render_rank_maps
from .report import summary_table
from .stats import SensitivityStats
from .targets import find_targets, linear_shape


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
        f"matrices: {len(allocation.ranks)}   rank sum: {sum(ranks)} (uniform LoRA: {allocation.avg_rank} x "
        f"{len(allocation.ranks)} = {allocation.avg_rank * len(allocation.ranks)})   "
        f"min/max rank: {min(ranks)}/{max(ranks)}",
        f"trainable LoRA parameters: sensilora {ours:,} vs uniform LoRA r={allocation.avg_rank} {uniform:,} "
        f"({ours / uniform:.3f}x; budget: {allocation.config.budget})",
    ]


def allocation_config(args):
    """The ``AllocationConfig`` the allocate options describe (validated before any slow work)."""
    check_calibration_options(
        args.mode, args.statistic, args.exclude_first, args.sequential, args.checkpoint, args.checkpoint_every,
        args.device, args.keep_grams,
    )  # fmt: skip
    return AllocationConfig(
        avg_rank=args.avg_rank, method=args.method, metrics=args.metrics, weighting=args.weighting, k_frac=args.k_frac,
        alpha=args.alpha, min_rank=args.min_rank, max_rank=args.max_rank, budget=args.budget,
        aggregation=args.aggregation, temperature=args.temperature, use_rslora=args.rslora,
        rank_multiple=args.rank_multiple,
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
        checkpoint=f"{args.checkpoint}.rank{args.rank}" if args.checkpoint and args.world > 1 else args.checkpoint,
    )  # fmt: skip
    stats.info.update(
        calibration_files={str(f): file_sha256(f) for f in files}, samples=args.samples, seq_len=args.seq_len,
        seed=args.seed, text_field=args.text_field,
    )  # fmt: skip
    return stats, model, name


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
        model, _, _ = load_model(args.model, args.device, args.dtype, progress=not args.quiet)
    return stats, model, stats.model_name or str(args.from_stats)


def run_allocate(args) -> int:

    # everything that can be checked without the model is checked before it is loaded
    config = allocation_config(args)
    check_output_paths({"--output": args.output, "--plot": args.plot, "--stats": args.stats})
    check_device(args.device)
    args.rank, args.world, args.device = join_torchrun(args.device)
    if args.rank != 0:  # only rank 0 reports and writes
        args.quiet = True
    stats, model, name = saved_statistics(args, config) if args.from_stats else new_statistics(args, config)
    allocation = allocate(stats, config, model=model, progress=not args.quiet)
    if args.rank != 0:
        return 0
    panels = per_metric_ranks(allocation.metrics, allocation.shapes, config)
    panels[f"combined ({config.method}, {config.metrics}, {config.weighting})"] = allocation.ranks
    title = f"Sensitivity-LoRA ranks: {name}, {stats.mode} mode, avg rank {config.avg_rank}"
    png = render_rank_maps(panels, title=title)
    if args.full_table:
        print_table(allocation)
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
    try:
        commit_outputs(outputs)
    except OSError as error:
        raise SensiloraError(f"writing the outputs failed ({error}); nothing was written") from None
    for line in summary_lines(allocation):
        print(line)
    print(f"calibration: {stats.info.get('tokens')} tokens in {stats.info.get('seconds', 0.0):.2f} s")
    print(f"wrote {', '.join(str(path) for path in outputs)}")
    return 0
