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
