"""The log-file handler of the rank logs (``logs/rank<R>.log``).

``logging.FileHandler`` writes through a buffered stream. submitit calls a task's
``checkpoint()`` from its SIGUSR2 handler, which runs in the main thread between two bytecodes
-- possibly in the middle of that stream's flush for another record. Logging to the same file
from the handler then raises "reentrant call inside BufferedWriter" and the record is lost.
Here each record is one ``os.write`` on an ``O_APPEND`` descriptor: no Python buffer to
re-enter, and lines from several processes appending to one file never interleave.
"""

from __future__ import annotations

import logging
import os
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
