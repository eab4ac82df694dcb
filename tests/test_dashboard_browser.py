"""The Dask dashboard of a running segment-volume, in a real browser (Debian's chromium,
headless, driven through the DevTools protocol): its progress shows the run's real slab total
in one group, its task stream names the slab under the mouse, and after the run the page
still shows the finished run (the command closes the page's connection after its last
update). A screenshot is kept under the test's tmp folder. In CI chromium is installed by
.ci/run; a missing chromium fails there."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
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


# Where the task stream draws its first segment-slab task (the widest), in the page's CSS
# pixels: the point to move the mouse to.
TASK_POINT_JS = """
(() => {
  const views = [];
  const walk = (v) => { views.push(v); for (const c of (v.child_views || [])) walk(c); };
  for (const r of Bokeh.index.roots) walk(r);
  const plot = views.find(v => v.model.name === "task_stream");
  if (!plot) return null;
  const glyph = [...plot.renderer_views.values()].find(r => r.model.type === "GlyphRenderer");
  const data = glyph.model.data_source.data;
  const d = data instanceof Map ? Object.fromEntries(data) : data;
  const keys = Array.from(d.key).map(String);
  let best = -1;
  keys.forEach((k, i) => {
    if (k.startsWith("segment-slab-") && (best < 0 || d.duration[i] > d.duration[best])) best = i;
  });
  if (best < 0) return null;
  const box = plot.el.getBoundingClientRect();
  return JSON.stringify({key: keys[best],
                         x: box.left + plot.frame.x_scale.compute(d.start[best]),
                         y: box.top + plot.frame.y_scale.compute(d.y[best])});
})()
"""

# The text of the tooltips shown (bokeh draws them in shadow roots).
TOOLTIP_JS = """
(() => {
  const texts = [];
  const walk = (root) => {
    for (const el of root.querySelectorAll("*")) {
      if (String(el.className).includes("bk-tooltip-content")
          && getComputedStyle(el).visibility !== "hidden") texts.push(el.innerText.trim());
      if (el.shadowRoot) walk(el.shadowRoot);
    }
  };
  walk(document);
  return JSON.stringify(texts);
})()
"""

# The progress plot's title ("Progress -- total: N, ...").
PROGRESS_TITLE_JS = """
(() => {
  for (const doc of (window.Bokeh && Bokeh.documents) || []) {
    for (const m of doc.all_models) {
      if (typeof m.text === "string" && m.text.startsWith("Progress")) return m.text;
    }
  }
  return null;
})()
"""


def progress_of(sources: list[dict]) -> dict | None:
    """The segment-slab row of the progress plot, from SOURCES_JS's columns."""
    for cols in sources:
        if "segment-slab" in cols.get("name", []) and "all" in cols:
            i = cols["name"].index("segment-slab")
            return {"groups": cols["name"], "all": int(cols["all"][i]),
                    "done": cols.get("done", [""])[i]}
    return None


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


async def hover_a_slab(tools: DevTools, deadline: float) -> dict:
    """Move the mouse onto a segment-slab task of the task stream; returns the task's key
    and the tooltips shown."""
    seen: dict = {"key": None, "tooltips": []}
    while time.monotonic() < deadline:
        point = await tools.evaluate(TASK_POINT_JS)
        if point:
            point = json.loads(point)
            await tools.call("Input.dispatchMouseEvent", type="mouseMoved",
                             x=point["x"], y=point["y"])
            await asyncio.sleep(0.3)
            seen = {"key": point["key"],
                    "tooltips": json.loads(await tools.evaluate(TOOLTIP_JS) or "[]")}
            if any(point["key"] in t for t in seen["tooltips"]):
                break
        await asyncio.sleep(0.5)
    return seen


async def watch_dashboard(devtools_port: int, page: str, want_total: int,
                          screenshot: Path, run: subprocess.Popen) -> dict:
    """Open ``page`` and wait until bokeh shows the progress group with ``want_total`` tasks
    and a task-stream entry; then, once ``run`` has ended, what the page shows: the progress
    and the tooltip of a slab in the task stream. Returns what the page showed."""
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
        seen["progress"] = progress_of(sources) or seen["progress"]
        for cols in sources:
            seen["slab_keys"] += [k for k in cols.get("key", [])
                                  if k.startswith("segment-slab-")]
        if seen["progress"] and seen["progress"]["all"] == want_total and seen["slab_keys"]:
            break
        await asyncio.sleep(0.5)
    # the run ends: the page keeps what it showed last, the finished run
    while run.poll() is None and time.monotonic() < deadline + 600:
        await asyncio.sleep(0.5)
    await asyncio.sleep(1.0)  # (anything the page would still receive)
    seen["final"] = progress_of(json.loads(await tools.evaluate(SOURCES_JS) or "[]"))
    seen["final_title"] = await tools.evaluate(PROGRESS_TITLE_JS)
    seen["hover"] = await hover_a_slab(tools, time.monotonic() + 30)
    shot = await tools.call("Page.captureScreenshot", format="png")
    screenshot.write_bytes(base64.b64decode(shot["data"]))
    ws.close()
    return seen


def test_dashboard_shows_the_real_slab_total_and_named_slabs(tmp_path):
    assert CHROMIUM, "chromium is missing: .ci/run installs it (apt-get install chromium)"
    from magseg_hpc.segment.pipeline import SegmentOptions, prepare

    volume = make_volume((48, 96, 96), seed=4)
    inp = write_input(tmp_path / "in.zarr", volume, (4, 32, 32))
    ckpt = make_checkpoint(tmp_path / "ckpt.pt")
    out = tmp_path / "out.zarr"
    total = len(prepare(SegmentOptions(str(inp), str(out), model=str(ckpt), slab_size=4,
                                       axes=("z", "y", "x"))).slabs)
    assert total > 16  # z, y and x passes and the fusion slabs
    port, devtools_port = free_port(), free_port()
    run = subprocess.Popen(
        [sys.executable, "-m", "magseg_hpc.cli", "segment-volume", str(inp), str(out),
         "--model", str(ckpt), "--slab-size", "4", "--axes", "z,y,x",
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
                                           total, screenshot, run))
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
    # after the run: the finished run, not an emptied scheduler's "total: 0"
    assert seen["final"] == {"groups": ["segment-slab"], "all": total,
                             "done": f"{total} / {total}"}, seen["final"]
    assert seen["final_title"].startswith(f"Progress -- total: {total},"), seen["final_title"]
    # the mouse on a task: its tooltip names the slab (number, plane, run), then its group
    hover = seen["hover"]
    assert re.fullmatch(r"segment-slab-\d{4}-(z|y|x|fuse)-[0-9a-f]{8}", hover["key"] or ""), hover
    assert any(t.startswith(hover["key"]) and "segment-slab:" in t
               for t in hover["tooltips"]), hover
    assert screenshot.stat().st_size > 10_000  # a rendered page, kept as the test's artefact
    # the terminal: the cluster lines, the progress bar and the summary; no dashboard noise
    assert "dashboard: http://127.0.0.1:" in stdout and "voxels/s" in stdout
    noise = [line for line in stderr.splitlines()
             if any(w in line for w in ("bokeh", "tornado", "Traceback", "W-1000", "WebSocket",
                                        "never awaited", "Warning", "periodic callback"))]
    assert not noise, noise
    log = (out / ".magseg" / "cluster.log").read_text()  # where the page's closing went
    assert "WebSocket connection closed: code=1001" in log
