"""Log files: the rank logs (``logs/rank<R>.log``) and their handler, and loggers sent to a file.

``logging.FileHandler`` writes through a buffered stream. submitit calls a task's
``checkpoint()`` from its SIGUSR2 handler, which runs in the main thread between two bytecodes
-- possibly in the middle of that stream's flush for another record. Logging to the same file
from the handler then raises "reentrant call inside BufferedWriter" and the record is lost.
Here each record is one ``os.write`` on an ``O_APPEND`` descriptor: no Python buffer to
re-enter, and lines from several processes appending to one file never interleave.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path


class AppendFileHandler(logging.Handler):
    def __init__(self, path: Path | str) -> None:
        super().__init__()
        self.baseFilename = os.path.abspath(path)  # the name logging.FileHandler uses
        self._fd: int | None = os.open(self.baseFilename,
                                       os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            data = (self.format(record) + "\n").encode("utf-8", "replace")
            while data and self._fd is not None:  # a regular file takes it in one write
                data = data[os.write(self._fd, data):]
        except Exception:
            self.handleError(record)

    def close(self) -> None:
        with self.lock:  # type: ignore[union-attr]
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None
        super().close()


def rank_formatter(rank: int) -> logging.Formatter:
    """A rank's log lines: time, rank, level, logger, message."""
    return logging.Formatter(f"%(asctime)s rank{rank} %(levelname)s %(name)s: %(message)s")


@contextlib.contextmanager
def rank_log(logs_dir: Path, rank: int) -> Iterator[Path]:
    """Every record of this process, INFO and up, also to ``logs_dir/rank<R>.log`` for the
    block: one handler on the root logger, so the package's records, submitit's (a requeue)
    and torch's alike. Opened again for the same file inside the block it adds nothing: a
    job that wraps a training in its rank log writes each line once."""
    path = Path(logs_dir) / f"rank{rank}.log"
    root = logging.getLogger()
    if any(getattr(h, "baseFilename", None) == os.path.abspath(path) for h in root.handlers):
        yield path
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = AppendFileHandler(path)
    handler.setLevel(logging.INFO)
    handler.setFormatter(rank_formatter(rank))
    pkg = logging.getLogger("magseg_hpc")
    old_level = pkg.level
    if pkg.getEffectiveLevel() > logging.INFO:
        pkg.setLevel(logging.INFO)
    root.addHandler(handler)
    try:
        yield path
    finally:
        root.removeHandler(handler)
        pkg.setLevel(old_level)  # setLevel: it also clears the loggers' cached isEnabledFor
        handler.close()


# Loggers of the Dask cluster in this process: the dashboard's web server (a browser opening
# or closing a page makes it log renderer warnings, websocket errors and tracebacks that say
# nothing about the run) and an in-process worker (a failed task's traceback, which the run
# reports in one line and keeps in its own failures log).
CLUSTER_LOGGERS = ("bokeh", "tornado", "distributed.dashboard", "distributed.http",
                   "distributed.worker")


@contextlib.contextmanager
def loggers_to_file(names, path: Path) -> Iterator[None]:
    """Send the records of the loggers ``names`` to ``path`` only (not the terminal), INFO
    and up, for the block."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = AppendFileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    loggers = [logging.getLogger(name) for name in names]
    saved = [(lg, lg.propagate, lg.level) for lg in loggers]
    for lg in loggers:
        lg.addHandler(handler)
        lg.propagate = False
        lg.setLevel(logging.INFO)
    try:
        yield
    finally:
        for lg, propagate, level in saved:
            lg.removeHandler(handler)
            lg.propagate = propagate
            # setLevel, not ``lg.level =``: it also clears the loggers' cached isEnabledFor,
            # else their children keep passing INFO (bokeh's "WebSocket connection closed")
            # to the terminal after the block
            lg.setLevel(level)
        handler.close()
