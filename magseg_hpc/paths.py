"""Volume arguments as paths: ``file.h5:/dataset`` names the file ``file.h5`` (also .hdf5,
.hdf, .nxs); anything else is a file or folder. The one parser of that syntax."""

from __future__ import annotations

import os
from pathlib import Path

HDF5_SUFFIXES = (".h5", ".hdf5", ".hdf", ".nxs")


def split_hdf5(text: str) -> tuple[str | None, str | None]:
    """(file, dataset) of ``file.h5:/dataset`` (dataset None when empty); (None, None) for a
    spec without an HDF5 file."""
    for suffix in HDF5_SUFFIXES:
        marker = suffix + ":"
        i = text.lower().find(marker)
        if i >= 0:
            return text[: i + len(suffix)], text[i + len(marker):] or None
    return None, None


def volume_file(spec: str | os.PathLike) -> Path:
    """The file or folder behind a volume argument."""
    h5_file, _ = split_hdf5(str(spec))
    return Path(h5_file if h5_file is not None else spec)


def absolute_spec(spec: str, *, resolve: bool = False) -> str:
    """``spec`` with its file made absolute (``~`` expanded; symlinks resolved with
    ``resolve``), an HDF5 ``:/dataset`` suffix kept as written."""
    text = str(spec)
    h5_file, _ = split_hdf5(text)
    head = h5_file if h5_file is not None else text
    path = Path(head).expanduser()
    return str(path.resolve() if resolve else path.absolute()) + text[len(head):]
