"""The checks every command that writes runs before writing: nothing a user owns is lost.

- ``check_output``: an output path may be created, or replaced with ``--overwrite`` only when
  it is a store magseg-hpc wrote itself (its ownership manifest ``.magseg/owner.json`` names
  a ``magseg-hpc/...`` format, or an export folder's ``manifest.json`` does) of the kind the
  command writes, holding nothing the manifest does not list. A plain folder, a regular file
  or another program's zarr store (one written from ours by xarray too) is refused with the
  reason, and never suggested for ``--overwrite``.
- ``check_no_overlap``: an output must not be an input, lie inside one, or (for outputs that
  replace a whole store) contain one.
- ``remove_tool_store``: the one place a store is deleted, re-checked right before.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path

from magseg_hpc.errors import MagsegError
from magseg_hpc.paths import TEMP_NAME_EXTRA, atomic_write, volume_file

TOOL_FORMAT_PREFIX = "magseg-hpc/"
# A store's ownership manifest: its format and the entries this tool wrote in it. A file, not a
# zarr attribute, so a store a user writes from one of ours (xarray copies attributes) is not
# taken for ours; an export folder's manifest.json plays the same part.
OWNER_FILE = Path(".magseg") / "owner.json"
EXPORT_MANIFEST = "manifest.json"


def record_owner(path: str | os.PathLike, fmt: str, entries: Iterable[str]) -> None:
    """Write ``path``'s ownership manifest: ``fmt`` and the top-level ``entries`` this tool
    created (named by the writer, never read from the folder: nothing a user put there is
    adopted)."""
    p = Path(path)
    entries = sorted(set(entries))
    target = p / OWNER_FILE
    target.parent.mkdir(exist_ok=True)
    atomic_write(target, json.dumps({"format": fmt, "entries": entries}, indent=1) + "\n")


def _manifest(path: Path) -> tuple[str, list[str]] | None:
    """(format, entries written by this tool) of a store or export folder of ours."""
    try:
        if (path / OWNER_FILE).is_file():
            record = json.loads((path / OWNER_FILE).read_text())
            fmt, entries = record.get("format"), list(record.get("entries") or [])
            entries += [".magseg", "zarr.json"]
        elif (path / EXPORT_MANIFEST).is_file() and not (path / "zarr.json").exists():
            record = json.loads((path / EXPORT_MANIFEST).read_text())
            fmt, entries = record.get("format"), [*record.get("files", []), EXPORT_MANIFEST]
        else:
            return None
    except (OSError, ValueError, AttributeError, TypeError):
        return None
    if not (isinstance(fmt, str) and fmt.startswith(TOOL_FORMAT_PREFIX)):
        return None
    return fmt, [str(e) for e in entries]


def tool_store_format(path: str | os.PathLike) -> str | None:
    """The format of a store or export folder this tool wrote (its ownership manifest), else
    None (never raises)."""
    found = _manifest(Path(path))
    return found[0] if found else None


def foreign_entries(path: str | os.PathLike) -> list[str]:
    """Top-level entries of a store of ours that this tool did not write (a user's)."""
    p = Path(path)
    found = _manifest(p)
    if found is None or not p.is_dir():
        return []
    return sorted(set(e.name for e in p.iterdir()) - set(found[1]))


def _what_is(path: Path) -> str:
    if path.is_symlink():
        return "a symbolic link"
    if path.is_file():
        return "a regular file"
    if not path.is_dir():
        return "not a regular file or folder"
    if any((path / m).exists() for m in ("zarr.json", ".zarray", ".zgroup")):
        return "a zarr store not written by magseg-hpc"
    return "a folder not written by magseg-hpc"


def _name(flag: str, path) -> str:
    return str(path) if flag == "output" else f"{flag} {path}"


def _kind(fmt: str | None) -> str:
    """'image' for magseg-hpc/image/1, 'label' for magseg-hpc/labels/1."""
    name = (fmt or "").split("/")[1] if fmt and fmt.count("/") >= 1 else "other"
    return {"labels": "label"}.get(name, name)


# The longest name written beside an output: DIR/.NAME.magseg-staging (staging.py), or a
# temp file of atomic_write (a report)
SIBLING_EXTRA = max(len("..magseg-staging"), TEMP_NAME_EXTRA)


def check_name_length(path: str | os.PathLike, flag: str = "output") -> None:
    """Refuse a path with a name longer than the file system allows (ENAMETOOLONG), the
    output's own name with room for the hidden files written beside it."""
    p = Path(path).absolute()
    name_max = 255  # until an existing folder tells its own limit
    for part in p.parts[1:]:
        if len(os.fsencode(part)) > name_max:
            break
    else:
        parent = p.parent
        while not parent.exists() and parent != parent.parent:
            parent = parent.parent
        with contextlib.suppress(OSError, ValueError):
            name_max = os.pathconf(parent, "PC_NAME_MAX")
        if len(os.fsencode(p.name)) + SIBLING_EXTRA <= name_max:
            return
    raise MagsegError(
        f"{_name(flag, path)}: a name is longer than this file system allows ({name_max} "
        f"bytes, {name_max - SIBLING_EXTRA} for the output's own name); choose a shorter one")


def check_writable_location(path: str | os.PathLike, flag: str = "output") -> None:
    """Refuse an output whose nearest existing ancestor is not a writable folder."""
    check_name_length(path, flag)
    p = Path(path).absolute()
    parent = p.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise MagsegError(f"{_name(flag, path)}: {parent} is a file, not a folder; "
                          "choose another path")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise MagsegError(f"{_name(flag, path)}: folder {parent} is not writable; "
                          "choose another path")


def check_output(
    path: str | os.PathLike,
    overwrite: bool = False,
    *,
    kind: str = "store",
    flag: str = "output",
    resume_hint: bool = False,
    expect: str | None = None,
) -> None:
    """Refuse an output that would clobber something this tool did not write.

    ``kind``: ``store`` (a zarr store replaced whole with --overwrite), ``file`` (one file,
    replaced; never a folder) or ``dir`` (a folder written into, e.g. figures or a run dir;
    never a file). ``resume_hint`` mentions --resume for an existing tool store. ``expect``:
    the format an existing store must have to be replaced (a label output never replaces an
    image store, e.g. a phantom with its ground truth, nor the other way round).
    """
    p = Path(path)
    check_writable_location(p, flag)
    if not (p.exists() or p.is_symlink()):
        return
    if kind == "file":
        if p.is_dir():
            raise MagsegError(f"{_name(flag, path)} is a folder; give a file path")
        return
    if kind == "dir":
        if not p.is_dir():
            raise MagsegError(f"{_name(flag, path)} is {_what_is(p)}; give a folder path")
        if not os.access(p, os.W_OK | os.X_OK):
            raise MagsegError(f"{_name(flag, path)}: folder is not writable; "
                              "choose another path")
        return
    if p.is_symlink() or tool_store_format(p) is None:
        raise MagsegError(
            f"{_name(flag, path)} already exists and is {_what_is(p)}; magseg-hpc replaces only "
            "stores it wrote, so choose another output path (or move it away yourself)"
        )
    found = tool_store_format(p)
    if expect is not None and found != expect:
        raise MagsegError(
            f"{_name(flag, path)} is a magseg-hpc {_kind(found)} store, and this command writes "
            f"{_kind(expect)} stores; choose another output path"
        )
    if not overwrite:
        hint = "pass --resume to continue it or --overwrite" if resume_hint else "pass --overwrite"
        raise MagsegError(f"{_name(flag, path)} already exists; {hint} to replace it")
    _refuse_foreign(p, flag)


def _refuse_foreign(p: Path, flag: str = "output") -> None:
    extra = foreign_entries(p)
    if extra:
        shown = ", ".join(extra[:5]) + (" ..." if len(extra) > 5 else "")
        raise MagsegError(
            f"{_name(flag, p)} holds entries magseg-hpc did not write ({shown}); they would be "
            "lost: move them out, or choose another output path"
        )


def check_no_overlap(
    output: str | os.PathLike | None,
    inputs: Iterable[str | os.PathLike | None],
    *,
    replaces: bool = True,
    flag: str = "output",
) -> None:
    """Refuse an output that is an input or lies inside one; with ``replaces`` (outputs that
    replace a whole store) also one that contains an input."""
    if output is None:
        return
    out = Path(output).resolve()
    for spec in inputs:
        if spec is None or str(spec) == "":
            continue
        inp = volume_file(spec).resolve()
        if inp == out:
            raise MagsegError(
                f"{_name(flag, output)} is the input {spec}; choose another output path")
        if inp in out.parents:
            raise MagsegError(
                f"{_name(flag, output)} lies inside the input {spec}; write outside the input"
            )
        if replaces and out in inp.parents:
            raise MagsegError(
                f"input {spec} lies inside the output {output}; choose an output that does "
                "not contain the input"
            )


def remove_tool_store(path: str | os.PathLike) -> None:
    """Delete a store this tool wrote; anything else is refused (the last line of defence)."""
    p = Path(path)
    if p.is_symlink() or tool_store_format(p) is None:
        raise MagsegError(f"refusing to delete {path}: it is {_what_is(p)}")
    _refuse_foreign(p)
    shutil.rmtree(p)


@contextlib.contextmanager
def removing_new_folders(path: str | os.PathLike) -> Iterator[None]:
    """Remove the (empty) folders up to ``path`` that the block created, e.g. a dry run's."""
    p = Path(path).absolute()
    first_new = None
    while not p.exists() and p != p.parent:
        first_new, p = p, p.parent
    try:
        yield
    finally:
        if first_new is not None and first_new.is_dir():
            for d in sorted((x for x in first_new.rglob("*") if x.is_dir()),
                            key=lambda x: len(x.parts), reverse=True):
                with contextlib.suppress(OSError):  # not empty: something else wrote there
                    d.rmdir()
            with contextlib.suppress(OSError):
                first_new.rmdir()
