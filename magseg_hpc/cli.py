"""The ``magseg-hpc`` command. Each subcommand lives in its own module under ``commands/``."""

from __future__ import annotations

import argparse
import contextlib
import faulthandler
import importlib
import logging
import shlex
import sys

from magseg_hpc import __version__
from magseg_hpc.errors import MagsegError, os_error_line

# Each command lives in magseg_hpc.commands.<name, "-" as "_">, whose register(subparsers)
# adds its parser with func=run(args) -> int. Only the command being run is imported (its
# module imports what the command needs, torch or dask included); `magseg-hpc -h` lists all.
COMMANDS = ("ingest", "info", "evaluate", "make-phantom", "import-masks", "export-slices",
            "suggest-slices", "preview", "segment-volume", "train", "configs", "demo", "submit")


def command_module(name: str) -> str:
    return f"magseg_hpc.commands.{name.replace('-', '_')}"


class OneLineParser(argparse.ArgumentParser):
    """Argument errors in one line (the usage is one -h away), exit status 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}; see `{self.prog} -h`\n")


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The parser of ``magseg-hpc argv``: the command named in ``argv`` only, else all."""
    parser = OneLineParser(
        prog="magseg-hpc",
        description="Segment 3D magnetization-domain volumes: prepare data, train, segment.",
    )
    parser.add_argument("--version", action="version", version=f"magseg-hpc {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    # provenance records the command line as given (a submitted job's too)
    parser.set_defaults(command_line=shlex.join(["magseg-hpc", *(argv or ())]))
    chosen = next((a for a in argv or () if not a.startswith("-")), None)
    for name in (chosen,) if chosen in COMMANDS else COMMANDS:
        importlib.import_module(command_module(name)).register(subparsers)
    return parser


def setup_logging(verbose: bool, level: int = logging.INFO) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else level,
        format="%(levelname)s %(name)s: %(message)s" if verbose else "%(message)s",
    )
    if not verbose:
        # Dask's cluster chatter (workers starting, comms closing) is not for users.
        for name in ("distributed", "dask_jobqueue", "bokeh", "tornado"):
            logging.getLogger(name).setLevel(logging.WARNING)


def run_command(args) -> int:
    """Run a parsed subcommand; user errors become one line on stderr and exit status 2."""
    try:
        return int(args.func(args) or 0)
    except MagsegError as e:
        print(f"magseg-hpc: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        line = os_error_line(e)
        if line is None:
            raise
        print(f"magseg-hpc: error: {line}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("magseg-hpc: interrupted", file=sys.stderr)
        return 130


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    with contextlib.suppress(RuntimeError, OSError):  # (no stderr, or one without a file)
        faulthandler.enable()  # a crash in native code (torch, codecs) names its Python stack
    args = build_parser(argv).parse_args(argv)
    setup_logging(args.verbose)
    return run_command(args)

if __name__ == "__main__":
    sys.exit(main())
