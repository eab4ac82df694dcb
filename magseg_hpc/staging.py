"""One writer per output, and replacement only once the new result is complete.

Beside an output ``DIR/NAME`` this tool keeps, hidden:

- ``DIR/.NAME.magseg-lock``: an exclusive ``flock`` held for a whole run (``writer_lock``); a
  second writer of the same output gets one line naming the holder (host, pid, start, command)
  from the file's contents. The holder removes the file as it lets go (a waiter that locked
  the removed file notices and retries on the new one); the kernel drops the lock when its
  holder dies, so a killed run leaves at most an unlocked file, never a lock to obey.
- ``DIR/.NAME.magseg-staging``: where ``--overwrite`` writes the new result while the old one
  stays in place (``staging_path``). Only when it is complete does ``promote`` swap it in:
  rename the old result to ``DIR/.NAME.magseg-old``, rename the staging to ``NAME``, delete the
  old one. A kill at any moment leaves either the old result or the new complete one at
  ``NAME``; ``recover`` (run under the lock before anything else) finishes or undoes a swap
  that a kill interrupted. An interrupted ``--overwrite`` is continued with ``--resume``.

A staging folder carries a marker (``.magseg/staging``, the target's path) from its creation
until it is swapped in; a leftover is removed only when it is recognisably ours.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import fcntl
import json
import os
import shutil
import socket
import sys
from collections.abc import Iterator
from pathlib import Path

from magseg_hpc.errors import MagsegError

STAGING_MARKER = Path(".magseg") / "staging"


def _sibling(target: str | os.PathLike, suffix: str) -> Path:
    p = Path(target).absolute()
    return p.parent / f".{p.name}.magseg-{suffix}"


def staging_path(target: str | os.PathLike) -> Path:
    return _sibling(target, "staging")


def is_staging(path: Path) -> bool:
    return (path / STAGING_MARKER).is_file()


_HELD: dict[Path, int] = {}  # locks this process holds: path -> nesting depth


@contextlib.contextmanager
def writer_lock(target: str | os.PathLike, command: str | None = None) -> Iterator[None]:
    """Hold the output's writer lock for the block, or refuse in one line naming the holder.
    Re-entrant within a process (a command takes it before starting a cluster, the library
    call inside again)."""
    path = _sibling(target, "lock")
    if path in _HELD:
        _HELD[path] += 1
        try:
            yield
        finally:
            _HELD[path] -= 1
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise MagsegError(
                f"{target} is being written by another run ({_holder(path)}); wait for it to "
                "finish or choose another output path") from None
        try:  # a holder removes the file as it lets go: then this lock is on a dead file
            if os.fstat(fd).st_ino == os.stat(path).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    try:
        holder = {"host": socket.gethostname(), "pid": os.getpid(),
                  "started": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                  "command": command or " ".join(["magseg-hpc", *sys.argv[1:]])}
        os.pwrite(fd, json.dumps(holder).encode(), 0)
        os.ftruncate(fd, len(json.dumps(holder).encode()))
        recover(target)
        _HELD[path] = 1
        yield
    finally:
        _HELD.pop(path, None)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        os.close(fd)  # releases the lock


def _holder(path: Path) -> str:
    try:
        h = json.loads(path.read_text())
        return f"pid {h['pid']} on {h['host']}, started {h['started']}: {h['command']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "holder unknown"


def begin_staging(target: str | os.PathLike) -> Path:
    """The staging path of ``target``, cleared of what an earlier interrupted run left there
    (ours: marked, a store this tool wrote, or empty); anything else is refused."""
    from magseg_hpc.outputs import tool_store_format

    path = staging_path(target)
    if path.exists() or path.is_symlink():
        ours = path.is_dir() and not path.is_symlink() and (
            is_staging(path) or tool_store_format(path) is not None
            or not any(path.iterdir()))
        if not ours:
            raise MagsegError(f"{path} exists and is not a magseg-hpc staging folder; move it "
                              "away and rerun")
        shutil.rmtree(path)
    return path


def mark_staging(path: Path, target: str | os.PathLike) -> None:
    (path / STAGING_MARKER).parent.mkdir(parents=True, exist_ok=True)
    (path / STAGING_MARKER).write_text(str(Path(target).absolute()))


def promote(staging: Path, target: str | os.PathLike) -> None:
    """Swap the complete ``staging`` in for ``target``; every step is one rename or a removal
    that ``recover`` can finish after a kill (module docstring)."""
    target, old = Path(target).absolute(), _sibling(target, "old")
    if target.exists():
        os.rename(target, old)
    os.rename(staging, target)
    recover(target)


def recover(target: str | os.PathLike) -> None:
    """Finish or undo a ``promote`` that a kill interrupted (under the writer lock). An old
    result beside the target means a swap was under way, and only complete stagings are
    swapped in."""
    target, old, staging = (Path(target).absolute(), _sibling(target, "old"),
                            staging_path(target))
    if old.exists() and not target.exists():
        if not is_staging(staging):  # the swap had not begun: the old result goes back
            os.rename(old, target)
            return
        os.rename(staging, target)
    if is_staging(target):
        (target / STAGING_MARKER).unlink()
        with contextlib.suppress(OSError):  # not empty: a segment-volume run record
            (target / STAGING_MARKER).parent.rmdir()
    if old.exists():
        shutil.rmtree(old)


@contextlib.contextmanager
def staged_output(path: str | os.PathLike, overwrite: bool, expect: str | None = None
                  ) -> Iterator[Path]:
    """Write a whole output into its staging and swap it in at the end, under the writer
    lock: the output is the old one or the complete new one, never half of either. For
    outputs written in one go (ingest, make-phantom, import-masks, export-slices); a failed
    or refused write leaves no staging behind."""
    from magseg_hpc.outputs import check_output

    path = Path(path)
    check_output(path, overwrite, expect=expect)
    with writer_lock(path):
        tmp = begin_staging(path)
        try:
            yield tmp
            if path.exists():
                check_output(path, overwrite, expect=expect)  # still one of ours, just before
            mark_staging(tmp, path)
            promote(tmp, path)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
