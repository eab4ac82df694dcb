"""The ``magseg-hpc`` command. Each subcommand lives in its own module under ``commands/``."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from magseg_hpc import __version__
from magseg_hpc.errors import USER_ERRNOS, MagsegError

# Each module exposes register(subparsers), which adds its parser with func=run(args) -> int.
COMMAND_MODULES = [
    "magseg_hpc.commands.ingest",
    "magseg_hpc.commands.info",
    "magseg_hpc.commands.evaluate",
    "magseg_hpc.commands.make_phantom",
    "magseg_hpc.commands.import_masks",
    "magseg_hpc.commands.export_slices",
    "magseg_hpc.commands.suggest_slices",
    "magseg_hpc.commands.preview",
    "magseg_hpc.commands.segment_volume",
    "magseg_hpc.commands.train",
    "magseg_hpc.commands.configs",
    "magseg_hpc.commands.demo",
    "magseg_hpc.commands.submit",
]


class OneLineParser(argparse.ArgumentParser):
    """Argument errors in one line (the usage is one -h away), exit status 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}; see `{self.prog} -h`\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="magseg-hpc",
        description="Segment 3D magnetization-domain volumes: prepare data, train, segment.",
    )
    parser.add_argument("--version", action="version", version=f"magseg-hpc {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
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
        if e.errno not in USER_ERRNOS:
            raise
        where = f"{e.filename}: " if e.filename else ""
        print(f"magseg-hpc: error: {where}{e.strerror}; check the permissions "
              "and free space", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("magseg-hpc: interrupted", file=sys.stderr)
        return 130


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    return run_command(args)

if __name__ == "__main__":
    sys.exit(main())
