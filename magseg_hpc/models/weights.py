"""Reading weight files safely: ``torch.load(weights_only=True)`` with one-line errors (the
checkpoint format, pretrained backbones and SAM weights all read through it)."""

from __future__ import annotations

from pathlib import Path

import torch

from magseg_hpc.errors import MagsegError


def read_weights(path: str | Path, *, missing: str, unreadable: str, fix: str):
    """``torch.load(path, weights_only=True)`` on the CPU with one-line errors.

    ``missing`` is the message for an absent file; ``unreadable`` and ``fix`` frame the
    message for a file torch cannot read. Files holding pickled objects are always refused.
    """
    path = Path(path)
    if not path.is_file():
        raise MagsegError(missing)
    with open(path, "rb") as f:
        head = f.read(4)
    # torch.save writes a zip archive; the legacy format starts with a pickle protocol byte
    if not (head.startswith(b"PK") or head[:1] == b"\x80"):
        raise MagsegError(f"{unreadable} (not a torch file: it starts with {head!r}); {fix}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        text = str(e)
        if "weights_only" in text or "Unsupported global" in text:
            raise MagsegError(
                f"refusing to load {path}: it holds pickled Python objects, not only tensors "
                "(a file from an unknown or untrusted source); use a file that holds tensors "
                "only (torch.save of a state dict)"
            ) from e
        first_line = text.splitlines()[0][:120] if text else ""
        raise MagsegError(f"{unreadable} ({type(e).__name__}: {first_line}); {fix}") from e
