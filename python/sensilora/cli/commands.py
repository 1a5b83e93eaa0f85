"""``sensilora export``, ``report``, ``merge``, ``compare`` and ``env``: each command's options and what it runs."""

from __future__ import annotations

import json
import warnings

from ..errors import SensiloraError
from .allocate import HELP_FORMAT


def compare_parser(sub) -> None:
    p = sub.add_parser("compare", help="how alike two ranks files are (e.g. from two calibration sets)")
    p.add_argument("first", help="a ranks JSON written by sensilora allocate")
    p.add_argument("second", help="another ranks JSON for the same model")
    p.add_argument("--json", action="store_true", help="print the comparison as JSON")


def export_parser(sub) -> None:
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
    from ..allocation import RankAllocation
    from ..calibration.models import load_model
    from ..integrations.export import check_adapter_dir, export_peft, export_text
    from ..integrations.lora import check_lora_options
    from ..io import check_output_paths, commit_outputs

    check_lora_options(args.lora_alpha, args.lora_dropout)
    if args.to == "peft":
        check_adapter_dir(args.out)
    else:
        check_output_paths({"out": args.out})
    allocation = RankAllocation.load(args.ranks)
    options = {"lora_alpha": args.lora_alpha, "lora_dropout": args.lora_dropout}
    if args.to != "peft":
        text = export_text(allocation, args.to, args.adapter_dir, **options)
        commit_outputs({args.out: lambda tmp: tmp.write_text(text, encoding="utf-8")})
    else:
        model, _, _ = load_model(args.model, progress=False, tokenizer=False, saved_class=True)
        export_peft(allocation, model, args.out, **options)
    print(f"wrote {args.out} ({args.to}; {len(allocation.ranks)} modules, avg rank {allocation.avg_rank})")
    return 0


def report_parser(sub) -> None:
    p = sub.add_parser("report", help="one PNG page: ranks and metrics per layer, the budget by module type")
    p.add_argument("ranks", help="a ranks JSON written by sensilora allocate")
    p.add_argument("-o", "--output", default="sensilora-out/report.png", help="the PNG to write")


def run_report(args) -> int:
    from ..allocation import RankAllocation
    from ..integrations.report import render_report, summary_table
    from ..io import check_output_paths, commit_outputs

    check_output_paths({"--output": args.output})
    allocation = RankAllocation.load(args.ranks)
    png = render_report(allocation)
    commit_outputs({args.output: lambda tmp: tmp.write_bytes(png)})
    print(summary_table(allocation))
    print(f"wrote {args.output}")
    return 0


def merge_parser(sub) -> None:
    p = sub.add_parser("merge", help="combine statistics files of separate runs, weighted by their token counts")
    p.add_argument("inputs", nargs="+", help="statistics files written by allocate --stats")
    p.add_argument("-o", "--output", required=True, help="the merged statistics file")


def run_merge(args) -> int:
    from ..calibration import SensitivityStats, merge_statistics
    from ..io import check_output_paths, commit_outputs

    check_output_paths({"--output": args.output})
    if len(args.inputs) < 2:
        raise SensiloraError("merge needs at least two statistics files")
    merged = merge_statistics(*(SensitivityStats.load(path) for path in args.inputs))
    commit_outputs({args.output: merged.write_to})
    print(f"wrote {args.output}: {merged.info['tokens']} tokens from {len(args.inputs)} files")
    return 0


def run_compare(args) -> int:
    from ..allocation import RankAllocation
    from ..integrations.compare import compare_allocations

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

    from .. import ops
    from ..version import __version__

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
