"""The Dask dashboard of a running segment-volume, in a real browser (Debian's chromium,
headless, driven through the DevTools protocol): its progress shows the run's real slab total
in one group, and its task stream names the slabs. A screenshot is kept under the test's tmp
folder. In CI chromium is installed by .ci/run; a missing chromium fails there."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from segment_utils import make_checkpoint, make_volume, write_input

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")

pytestmark = pytest.mark.skipif(
    CHROMIUM is None and not os.environ.get("CI"),
    reason="chromium not installed (apt-get install chromium); CI installs it",
)

# What bokeh's documents hold: every ColumnDataSource's columns (Map in recent BokehJS).
SOURCES_JS = """
(() => {
  const docs = (window.Bokeh && Bokeh.documents) || [];
  const out = [];
  for (const doc of docs) {
    for (const m of doc.all_models) {
      if (m.type !== "ColumnDataSource" && !(m.data && (m.data.get || m.data.name))) continue;
      const d = m.data instanceof Map ? Object.fromEntries(m.data) : m.data;
      const cols = {};
      for (const k of ["name", "all", "memory", "done", "key"]) {
        if (d && d[k] !== undefined) cols[k] = Array.from(d[k]).map(String);
      }
      if (Object.keys(cols).length) out.push(cols);
    }
  }
  return JSON.stringify(out);
})()
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, deadline: float, proc: subprocess.Popen | None = None) -> None:
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"process ended early: {proc.communicate()}")
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except OSError:
            time.sleep(0.2)
    raise AssertionError(f"{url} did not answer")


class DevTools:
    """The smallest DevTools protocol client: send a command, wait for its reply."""

    def __init__(self, ws):
        self.ws, self.next_id = ws, 0

    async def call(self, method: str, **params):
        self.next_id += 1
        self.ws.write_message(json.dumps({"id": self.next_id, "method": method,
                                          "params": params}))
        while True:
            msg = await asyncio.wait_for(self.ws.read_message(), 30)
            if msg is None:
                raise AssertionError("the browser closed the DevTools connection")
            reply = json.loads(msg)
            if reply.get("id") == self.next_id:
                if "error" in reply:
                    raise AssertionError(f"{method}: {reply['error']}")
                return reply.get("result", {})

    async def evaluate(self, expression: str):
        result = await self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        return result.get("result", {}).get("value")


async def watch_dashboard(devtools_port: int, page: str, want_total: int,
                          screenshot: Path) -> dict:
    """Open ``page`` and wait until bokeh shows the progress group with ``want_total`` tasks
    and a task-stream entry; returns what the page showed."""
    from tornado.websocket import websocket_connect

    targets = json.loads(urllib.request.urlopen(
        f"http://127.0.0.1:{devtools_port}/json/list", timeout=5).read())
    target = next(t for t in targets if t["type"] == "page")
    ws = await websocket_connect(target["webSocketDebuggerUrl"], max_message_size=2**28)
    tools = DevTools(ws)
    await tools.call("Page.enable")
    await tools.call("Emulation.setDeviceMetricsOverride", width=1400, height=1100,
                     deviceScaleFactor=1, mobile=False)  # the whole status page in the shot
    await tools.call("Page.navigate", url=page)
    seen: dict = {"progress": None, "slab_keys": []}
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        sources = json.loads(await tools.evaluate(SOURCES_JS) or "[]")
        for cols in sources:
            if "segment-slab" in cols.get("name", []) and "all" in cols:
                i = cols["name"].index("segment-slab")
                seen["progress"] = {"groups": cols["name"], "all": int(cols["all"][i]),
                                    "done": cols.get("done", [""])[i]}
            seen["slab_keys"] += [k for k in cols.get("key", [])
                                  if k.startswith("segment-slab-")]
        if seen["progress"] and seen["progress"]["all"] == want_total and seen["slab_keys"]:
            break
        await asyncio.sleep(0.5)
    shot = await tools.call("Page.captureScreenshot", format="png")
    screenshot.write_bytes(base64.b64decode(shot["data"]))
    ws.close()
    return seen


def test_dashboard_shows_the_real_slab_total_and_named_slabs(tmp_path):
    assert CHROMIUM, "chromium is missing: .ci/run installs it (apt-get install chromium)"
    from magseg_hpc.segment.pipeline import SegmentOptions, prepare

    volume = make_volume((64, 128, 128), seed=4)
    inp = write_input(tmp_path / "in.zarr", volume, (4, 32, 32))
    ckpt = make_checkpoint(tmp_path / "ckpt.pt")
    out = tmp_path / "out.zarr"
    total = len(prepare(SegmentOptions(str(inp), str(out), model=str(ckpt), slab_size=4,
                                       axes=("z", "y", "x"))).slabs)
    assert total > 16  # z, y and x passes and the fusion slabs
    port, devtools_port = free_port(), free_port()
    run = subprocess.Popen(
        [sys.executable, "-m", "magseg_hpc.cli", "segment-volume", str(inp), str(out),
         "--model", str(ckpt), "--slab-size", "4", "--tta", "--axes", "z,y,x",
         "--workers", "1", "--threads-per-worker", "1",
         "--dashboard-address", f"127.0.0.1:{port}"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    browser = None
    try:
        wait_http(f"http://127.0.0.1:{port}/status", time.monotonic() + 120, run)
        browser = subprocess.Popen(
            [CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu",
             "--disable-dev-shm-usage", f"--remote-debugging-port={devtools_port}",
             f"--user-data-dir={tmp_path / 'chromium'}", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        wait_http(f"http://127.0.0.1:{devtools_port}/json/version", time.monotonic() + 60)
        screenshot = tmp_path / "dashboard.png"
        seen = asyncio.run(watch_dashboard(devtools_port, f"http://127.0.0.1:{port}/status",
                                           total, screenshot))
        stdout, stderr = run.communicate(timeout=600)
    finally:
        for proc in (browser, run):
            if proc is not None and proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    assert run.returncode == 0, stderr
    assert seen["progress"] is not None, "the progress plot never showed segment-slab"
    assert seen["progress"]["all"] == total, seen["progress"]
    assert seen["progress"]["groups"] == ["segment-slab"]  # one group for the whole run
    assert seen["slab_keys"], "the task stream never named a slab"
    assert screenshot.stat().st_size > 10_000  # a rendered page, kept as the test's artefact
    # the terminal: the cluster lines, the progress bar and the summary; no dashboard noise
    assert "dashboard: http://127.0.0.1:" in stdout and "voxels/s" in stdout
    noise = [line for line in stderr.splitlines()
             if any(w in line for w in ("bokeh", "tornado", "Traceback", "W-1000"))]
    assert not noise, noise
