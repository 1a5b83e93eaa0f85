"""The command-line options every part of the quality suite shares (``regime``, ``screen``, ``confirm``)."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from benchmarks.common import RESULTS


def parse(doc: str, argv, tasks=None, seeds_help: str | None = None, flags: dict | None = None) -> argparse.Namespace:
    """--smoke, --results, --threads (applied here), and --tasks from ``tasks``, --seeds where asked for, and
    a part's own switches (``flags``: {"--name": help})."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="a seconds-long run that only checks the harness")
    for flag, text in (flags or {}).items():
        parser.add_argument(flag, action="store_true", help=text)
    if tasks is not None:
        parser.add_argument("--tasks", nargs="+", choices=list(tasks), default=list(tasks))
    parser.add_argument("--results", type=Path, default=RESULTS, help="output folder (default benchmarks/results)")
    if seeds_help is not None:
        parser.add_argument("--seeds", type=int, help=seeds_help)
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    return args
