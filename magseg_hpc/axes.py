"""The axis names of every volume, in storage order: slices are taken along any of them."""

from __future__ import annotations

from magseg_hpc.errors import MagsegError

AXES = ("z", "y", "x")


def parse_axes(text: str | tuple | list) -> tuple[str, ...]:
    """``"z,y,x"`` (a flag's text) or a sequence of names -> a tuple of distinct axes."""
    parts = [p.strip() for p in text.split(",")] if isinstance(text, str) else list(text)
    bad = [p for p in parts if p not in AXES]
    if bad or not parts:
        raise MagsegError(
            f"--axes {text if isinstance(text, str) else ','.join(text)!s}: unknown axis "
            f"{', '.join(map(repr, bad)) or '(none)'}; use axes from z, y, x "
            "(e.g. --axes z, or --axes z,y,x for orthoplane fusion)"
        )
    if len(set(parts)) != len(parts):
        raise MagsegError(f"--axes {text}: an axis is repeated; give each of z, y, x at most once")
    return tuple(parts)
