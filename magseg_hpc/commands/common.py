"""Argument types shared by the subcommands."""

from __future__ import annotations

import argparse


def int_triple(text: str) -> tuple[int, int, int]:
    """Parse ``Z,Y,X`` (three positive integers)."""
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        values = ()
    if len(values) != 3 or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected three positive integers Z,Y,X, got {text!r}")
    return values  # type: ignore[return-value]


def int_list(text: str) -> list[int]:
    """Parse ``N,N,...`` (slice indices; at least one)."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values:
        raise argparse.ArgumentTypeError(f"expected slice indices like 10,64,120, got {text!r}")
    return values


def outside_option(text: str) -> str:
    """``--outside``: auto, none, nan or a number (checked here, decided later)."""
    from magseg_hpc.errors import MagsegError
    from magseg_hpc.volume.support import parse_outside

    try:
        parse_outside(text)
    except MagsegError as e:
        raise argparse.ArgumentTypeError(str(e).removeprefix(f"--outside {text}: ")) from e
    return text


def add_support_options(p: argparse.ArgumentParser) -> None:
    """``--outside`` and ``--mask``: where the sample's outside is, when detection should not
    decide (magseg_hpc.volume.support)."""
    from magseg_hpc.volume.support import OPTION_HELP

    p.add_argument("--outside", type=outside_option, default="auto", metavar="WHAT",
                   help=f"how the volume's outside is encoded: {OPTION_HELP}")
    p.add_argument("--mask", default=None, metavar="PATH",
                   help="a mask volume (any readable format, the same shape, non-zero inside "
                   "the sample): voxels where it is 0 are the outside")
