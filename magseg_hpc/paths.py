"""Volume arguments as paths: ``file.h5:/dataset`` names the file ``file.h5`` (also .hdf5,
.hdf, .nxs); anything else is a file or folder. The one parser of that syntax.

And the one "write to a temp file, then rename" of the package (``atomic_write``), with the
removal of the temp files a killed write leaves (``remove_temp_files``).
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import BinaryIO

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


TEMP_SUFFIX = ".magseg-tmp"  # what names a temp file of atomic_write: .NAME.<hex>.magseg-tmp
TEMP_NAME_EXTRA = len("..") + 6 + len(TEMP_SUFFIX)  # bytes a temp name adds to NAME


def atomic_write(path: str | os.PathLike, data: bytes | str | Callable[[BinaryIO], None], *,
                 fsync: bool = False) -> None:
    """Write ``path`` whole or not at all: into a new temp file beside it (created with
    O_EXCL and O_NOFOLLOW: nothing planted under its name is written through), then one
    rename over ``path``, so a reader sees the old file or the new one, never half. ``data``:
    bytes, text (UTF-8) or a function writing to the open binary file. A failure removes
    the temp file; what a kill leaves the next run removes (``remove_temp_files``)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(3)}{TEMP_SUFFIX}")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(tmp, flags, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            if callable(data):
                data(f)
            else:
                f.write(data.encode() if isinstance(data, str) else data)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def remove_temp_files(folder: str | os.PathLike, names: Iterable[str]) -> list[Path]:
    """Remove the temp files that killed atomic writes of the files ``names`` left in
    ``folder``: ``.NAME.<hex>.magseg-tmp``, and earlier versions' ``.NAME.tmp``,
    ``.NAME.<random>.tmp``, ``.NAME.tmp.png`` and ``NAME.tmp``; nothing else. For the one
    writer of those files (under its writer lock): another's temp file would vanish."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    names = list(names)
    prefixes = tuple(f".{name}." for name in names)
    exact = {f".{name}.tmp" for name in names} | {f"{name}.tmp" for name in names}
    removed = []
    for p in folder.iterdir():
        name = p.name
        ours = name.startswith(prefixes) and name.endswith((TEMP_SUFFIX, ".tmp", ".tmp.png"))
        if (ours or name in exact) and p.is_file() and not p.is_symlink():
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
                removed.append(p)
    return removed
