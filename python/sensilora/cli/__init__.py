"""Command line: ``sensilora allocate`` (the main job, ``allocate``), and ``export``, ``report``, ``merge``,
``compare``, ``env`` (``commands``). Every failure is one line and exit code 2; Ctrl-C and SIGTERM exit
130 / 143 having written nothing."""

from __future__ import annotations

import argparse
import sys
import warnings

from ..errors import BackendUnavailableError, SensiloraError
from ..version import __version__
from . import allocate, commands

COMMANDS = {
    "allocate": allocate.run_allocate,
    "compare": commands.run_compare,
    "env": commands.run_env,
    "export": commands.run_export,
    "merge": commands.run_merge,
    "report": commands.run_report,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sensilora", description="Sensitivity-LoRA rank allocation")
    parser.add_argument("--version", action="version", version=f"sensilora {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    allocate.add_parser(sub)
    commands.compare_parser(sub)
    commands.export_parser(sub)
    commands.merge_parser(sub)
    commands.report_parser(sub)
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
