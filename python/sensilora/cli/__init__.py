"""Command line: ``sensilora allocate`` (the main job, ``allocate``), and ``export``, ``report``, ``merge``,
``compare``, ``env`` (``commands``). Every failure is one line and exit code 2; Ctrl-C and SIGTERM (what
``timeout``, Slurm and Kubernetes send) exit 130 / 143 having written nothing."""

from __future__ import annotations

import argparse
import signal
import sys
import warnings

from ..errors import BackendUnavailableError, SensiloraError
from ..version import __version__

EXIT_INTERRUPTED, EXIT_TERMINATED = 130, 143  # 128 + SIGINT, 128 + SIGTERM, as a shell reports them


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the program is so that it unwinds (and cleans up) exactly as Ctrl-C does."""


def _raise_terminated(signum, frame):
    raise Terminated


class OneLineParser(argparse.ArgumentParser):
    """argparse whose usage errors are one line (the usage block is one ``-h`` away)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}; see {self.prog} -h\n")


def build_parser() -> argparse.ArgumentParser:
    from . import allocate, commands  # here, not at import: ``--version`` answers without loading torch

    parser = OneLineParser(prog="sensilora", description="Sensitivity-LoRA rank allocation")
    parser.add_argument("--version", action="version", version=f"sensilora {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    allocate.add_parser(sub)
    commands.compare_parser(sub)
    commands.export_parser(sub)
    commands.merge_parser(sub)
    commands.report_parser(sub)
    sub.add_parser("env", help="versions, and which kernel serves each op on each device, and why")
    parser.set_defaults(run=None)
    for name, run in {
        "allocate": allocate.run_allocate,
        "compare": commands.run_compare,
        "env": commands.run_env,
        "export": commands.run_export,
        "merge": commands.run_merge,
        "report": commands.run_report,
    }.items():
        sub.choices[name].set_defaults(run=run)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv == ["--version"]:
        print(f"sensilora {__version__}")
        return 0
    args = build_parser().parse_args(argv)
    try:
        previous = signal.signal(signal.SIGTERM, _raise_terminated)
    except ValueError:  # not the main thread (main called from a worker): SIGTERM keeps its handler
        previous = None
    try:
        with warnings.catch_warnings():  # a warning is one line too
            warnings.showwarning = lambda message, *_args, **_kw: print(
                f"sensilora {args.command}: warning: {message}", file=sys.stderr
            )
            # one library's deprecated use of another's API (peft of transformers): nothing a user can act on
            for category in (DeprecationWarning, PendingDeprecationWarning, FutureWarning):
                warnings.filterwarnings("ignore", category=category, module=r"(?!sensilora)")
            return args.run(args)
    except (SensiloraError, BackendUnavailableError) as error:
        print(f"sensilora {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as stop:  # outputs are committed only at the very end: nothing is left behind
        terminated = isinstance(stop, Terminated)
        print(f"sensilora {args.command}: {'terminated' if terminated else 'interrupted'}; nothing was written",
              file=sys.stderr)  # fmt: skip
        return EXIT_TERMINATED if terminated else EXIT_INTERRUPTED
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
