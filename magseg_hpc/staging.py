"""One writer per output, and replacement only once the new result is complete.

Beside an output ``DIR/NAME`` this tool keeps, hidden:

- ``DIR/.NAME.magseg-lock``: an exclusive ``flock`` held for a whole run (``writer_lock``); a
  second writer of the same output gets one line naming the holder (host, pid, start, command)
  from the file's contents. The holder removes the file as it lets go (a waiter that locked
  the removed file notices and retries on the new one); the kernel drops the lock when its
  holder dies, so a killed run leaves at most an unlocked file, never a lock to obey. The
  file is created with O_EXCL and opened with O_NOFOLLOW: a symbolic link, a folder or a
  user's file under that name is refused in one line and left as it is.
- ``DIR/.NAME.magseg-staging/NAME``: where ``--overwrite`` writes the new result while the
  old one stays in place (``staging_path``). The hidden folder around it is marked as this
  tool's (``.magseg-staging``, the target's path) before anything is written into it, so a
  run killed at any moment leaves a leftover that the next run recognises and clears. Only
  when the new result is complete does ``promote`` swap it in: rename the old result to
  ``DIR/.NAME.magseg-old``, rename the new one to ``NAME``, delete the old one and the empty
  staging folder. A kill at any moment leaves either the old result or the new complete one
  at ``NAME``; ``recover`` (run under the lock before anything else) finishes or undoes a
  swap that a kill interrupted. An interrupted ``--overwrite`` is continued with
  ``--resume``.

Leftovers are deleted by renaming them to ``DIR/.NAME.magseg-trash`` first (one atomic step)
and then removing that, so a kill in the middle of a deletion never leaves a half-deleted
folder that no longer looks like ours.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import fcntl
import json
import os
import shutil
import socket
import stat
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from magseg_hpc.errors import MagsegError
from magseg_hpc.outputs import check_output

STAGING_MARK = ".magseg-staging"  # the file that makes a staging folder ours


def _sibling(target: str | os.PathLike, suffix: str) -> Path:
    p = Path(target).absolute()
    return p.parent / f".{p.name}.magseg-{suffix}"


def staging_path(target: str | os.PathLike) -> Path:
    """Where a replacement of ``target`` is written (inside its marked staging folder)."""
    return _sibling(target, "staging") / Path(target).absolute().name


def is_staging(path: Path) -> bool:
    """Whether ``path`` is a staged result inside a staging folder of ours."""
    return path.exists() and (path.parent / STAGING_MARK).is_file()


def _discard(target: str | os.PathLike, path: Path) -> None:
    """Delete a leftover of ``target``'s: renamed aside in one step, then removed."""
    trash = _sibling(target, "trash")
    if path != trash:
        if trash.exists():  # what a kill during an earlier deletion left
            shutil.rmtree(trash)
        os.rename(path, trash)
    shutil.rmtree(trash)


@contextlib.contextmanager
def writer_lock(target: str | os.PathLike, command: str | None = None) -> Iterator[None]:
    """Hold the output's writer lock for the block, or refuse in one line naming the holder.
    Taken once per run: a second ``writer_lock`` of the same output, in this process too, is
    another writer and refused."""
    path = _sibling(target, "lock")
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd, created = _open_lock(path, target)
        if fd is None:  # removed between two opens: try again
            continue
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
    if not created and not _is_lock_content(os.pread(fd, 65536, 0)):
        os.close(fd)  # someone's file under our name: neither written nor removed
        raise MagsegError(_not_a_lock(path, target, "a file not written by magseg-hpc"))
    try:
        holder = {"host": socket.gethostname(), "pid": os.getpid(),
                  "started": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                  "command": command or " ".join(["magseg-hpc", *sys.argv[1:]])}
        os.pwrite(fd, json.dumps(holder).encode(), 0)
        os.ftruncate(fd, len(json.dumps(holder).encode()))
        recover(target)
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        os.close(fd)  # releases the lock


def _open_lock(path: Path, target) -> tuple[int | None, bool]:
    """(descriptor, created) of the lock file: created with O_EXCL where it is new, opened
    with O_NOFOLLOW where it exists, so a symbolic link planted there never has a user's
    file written or deleted through it; anything but a regular file is refused."""
    flags = os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        return os.open(path, flags | os.O_CREAT | os.O_EXCL, 0o644), True
    except FileExistsError:
        pass
    try:
        fd = os.open(path, flags | os.O_NONBLOCK)  # O_NONBLOCK: a FIFO there cannot hang us
    except FileNotFoundError:
        return None, False
    except OSError as e:  # ELOOP: a symbolic link; EISDIR: a folder
        raise MagsegError(_not_a_lock(path, target, _kind_of(path))) from e
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise MagsegError(_not_a_lock(path, target, _kind_of(path)))
    return fd, False


def _kind_of(path: Path) -> str:
    if path.is_symlink():
        return "a symbolic link"
    return "a folder" if path.is_dir() else "not a regular file"


def _not_a_lock(path: Path, target, what: str) -> str:
    return (f"{path} (the writer lock of {target}) is {what}; magseg-hpc uses that name for "
            "its own lock file only: move it away and rerun")


def _is_lock_content(data: bytes) -> bool:
    """Empty (a holder killed before writing) or a holder record (``writer_lock``)."""
    if not data:
        return True
    try:  # raw_decode: a holder killed between its write and truncate leaves a tail
        record, _ = json.JSONDecoder().raw_decode(data.decode())
        return isinstance(record, dict) and {"host", "pid"} <= set(record)
    except ValueError:  # UnicodeDecodeError included
        return False


def _holder(path: Path) -> str:
    """The holder's record; a lock taken a moment ago may not hold it yet (the holder writes
    it just after locking), so an empty or half-written file is read again for a while."""
    for _ in range(40):
        try:
            h, _end = json.JSONDecoder().raw_decode(path.read_text())
            return f"pid {h['pid']} on {h['host']}, started {h['started']}: {h['command']}"
        except (OSError, ValueError, KeyError, TypeError):
            time.sleep(0.05)
    return "holder unknown"


def begin_staging(target: str | os.PathLike) -> Path:
    """A fresh, marked staging folder for ``target`` (what an interrupted run left there is
    cleared when it is ours: marked, or empty); the path to write the new result to."""
    folder = _sibling(target, "staging")
    if folder.exists() or folder.is_symlink():
        ours = folder.is_dir() and not folder.is_symlink() and (
            (folder / STAGING_MARK).is_file() or not any(folder.iterdir()))
        if not ours:
            raise MagsegError(f"{folder} exists and is not a magseg-hpc staging folder; move it "
                              "away and rerun")
        _discard(target, folder)
    folder.mkdir(parents=True)
    (folder / STAGING_MARK).write_text(str(Path(target).absolute()))
    return staging_path(target)


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
    result beside a missing target means a swap was under way: promote only moves the old
    result aside once the new one is complete."""
    target, old, staging = (Path(target).absolute(), _sibling(target, "old"),
                            staging_path(target))
    trash = _sibling(target, "trash")
    if trash.is_dir() and not trash.is_symlink():  # a deletion that a kill interrupted
        shutil.rmtree(trash)
    if old.exists() and not target.exists():
        if not is_staging(staging):  # nothing to swap in: the old result goes back
            os.rename(old, target)
            return
        os.rename(staging, target)
    if old.exists():
        _discard(target, old)
    folder = staging.parent
    if (folder / STAGING_MARK).is_file() and not staging.exists():  # swapped in, or never used
        _discard(target, folder)


@contextlib.contextmanager
def staged_output(path: str | os.PathLike, overwrite: bool, expect: str | None = None
                  ) -> Iterator[Path]:
    """Write a whole output into its staging and swap it in at the end, under the writer
    lock: the output is the old one or the complete new one, never half of either. For
    outputs written in one go (ingest, make-phantom, import-masks, export-slices); a failed
    or refused write leaves no staging behind."""
    path = Path(path)
    check_output(path, overwrite, expect=expect)
    with writer_lock(path):
        tmp = begin_staging(path)
        try:
            yield tmp
            if path.exists():
                check_output(path, overwrite, expect=expect)  # still one of ours, just before
            promote(tmp, path)
        finally:
            if tmp.parent.exists():  # a failed or refused write
                _discard(path, tmp.parent)
