"""What a new user sees: segment-volume in a real terminal (a pseudo-terminal) prints the lines
it means to print, its progress bar and its summary, and nothing else (no library's warning,
no log line through the bar); the summary counts each voxel once."""

from __future__ import annotations

import logging
import math
import os
import re
import select
import sys
import time

import numpy as np
import pytest
from segment_utils import make_volume, write_input

from magseg_hpc.segment.blocks import plan_passes
from magseg_hpc.segment.pipeline import RunSummary, _account

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="needs a POSIX pseudo-terminal")

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def run_in_terminal(argv: list[str], timeout: float = 240) -> tuple[int, str]:
    """Run ``argv`` with stdin, stdout and stderr on one 100-column pseudo-terminal; returns
    (exit status, everything the terminal received)."""
    import fcntl
    import pty
    import struct
    import termios

    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONWARNINGS", "COLUMNS")}
    pid, fd = pty.fork()
    if pid == 0:  # the child: the command, on the terminal
        os.execve(argv[0], argv, {**env, "TERM": "xterm"})
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    received, deadline = b"", time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([fd], [], [], 1.0)
            if not ready:
                continue
            try:
                data = os.read(fd, 65536)
            except OSError:  # the child closed the terminal
                break
            if not data:
                break
            received += data
    finally:
        os.close(fd)
    if time.monotonic() >= deadline:
        os.kill(pid, 9)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), received.decode("utf-8", "replace")


def screen_lines(text: str) -> list[str]:
    """Every line the terminal showed, each progress bar frame (after a carriage return)
    its own line; escape sequences and blank lines left out."""
    text = ANSI.sub("", text)
    return [part.strip() for line in text.split("\n") for part in line.split("\r")
            if part.strip()]


def test_segment_volume_in_a_terminal_prints_its_lines_its_bar_and_its_summary(tmp_path):
    volume = np.abs(make_volume((8, 32, 32), seed=2))
    volume[:, :3] = 0  # an outside for the baseline's support
    inp = write_input(tmp_path / "in.zarr", volume, (2, 32, 32))
    out = tmp_path / "out.zarr"
    code, text = run_in_terminal([sys.executable, "-m", "magseg_hpc.cli", "segment-volume",
                                  str(inp), str(out), "--method", "threshold",
                                  "--slab-size", "2", "--dashboard-address", "127.0.0.1:0"])
    lines = screen_lines(text)
    assert code == 0, text
    expected = [
        r"threshold baseline: .*support .*",
        r"local cluster: 1 worker x \d+ torch threads?",
        r"dashboard: http://127\.0\.0\.1:\d+/status",
        r"one worker in this process: .*",
        rf"4 slabs -> {re.escape(str(out))}",
        r"segment: +\d+%\|.*\| [0-4]/4 \[.*slab.*\]",  # the progress bar, frame by frame
        rf"segmented {re.escape(str(out))}: volume 8x32x32, axes z; 4 slabs run, 0 already "
        r"done, 0 failed",
        r"8,192 voxels, 8 slices in [\d.]+ s: [\d,]+ voxels/s",
        r"worker 0: 4 slabs, .*",
    ]
    unexpected = [line for line in lines if not any(re.fullmatch(p, line) for p in expected)]
    assert not unexpected, "\n".join(unexpected)  # e.g. a ZarrUserWarning, a log line
    assert [line for line in lines if "4/4" in line], "the bar never showed 4/4"
    assert lines[-3].startswith("segmented ")  # the summary comes last, after the bar
    assert sum(bool(re.fullmatch(p, line)) for p in expected[:5] for line in lines) == 5


def test_a_three_plane_run_counts_each_voxel_once():
    """64x256x256 along z, y and x in slabs of 16: 4,194,304 voxels (a share rounded up per
    slab made it 4,194,328)."""
    shape, axes = (64, 256, 256), ("z", "y", "x")
    slabs = plan_passes(shape, axes, dict.fromkeys(axes, 16), 16, 16)
    summary = RunSummary("out.zarr", shape, axes, len(slabs))
    for slab in slabs:
        voxels = math.prod(r.stop - r.start for r in slab.region(shape))
        _account(summary, {"stage": slab.stage, "slices": slab.num_slices(), "voxels": voxels,
                           "worker": "0", "seconds": 1.0, "read_s": 0.0, "compute_s": 1.0,
                           "write_s": 0.0}, len(axes))
    assert summary.voxels == math.prod(shape)
    assert "4,194,304 voxels" in summary.format()


def test_an_abandoned_close_timeout_is_not_printed_and_other_lost_errors_are(caplog):
    """Dask's close steps wait with tornado timeouts; one that fires as the cluster's event loop
    stops is never read, and asyncio prints "Future exception was never retrieved ...
    TimeoutError: Timeout" after the run's summary (seen once in CI). Other lost errors
    still reach the log."""
    import asyncio
    import gc

    from magseg_hpc.launch.dask_cluster import quiet_dask_logs

    quiet_dask_logs()
    quiet_dask_logs()  # once only
    loop = asyncio.new_event_loop()
    try:
        for error in (TimeoutError("Timeout"), ValueError("a real lost error")):
            future = loop.create_future()
            future.set_exception(error)
            del future
            gc.collect()
    finally:
        loop.close()
    lost = [r for r in caplog.records if r.name == "asyncio"]
    assert [type(r.exc_info[1]).__name__ for r in lost] == ["ValueError"]
    assert len(logging.getLogger("asyncio").filters) == 1
