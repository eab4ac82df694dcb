"""Ingest throughput and peak memory: streaming ``ingest`` vs numpy load-then-write.

Makes a float32 NPY volume larger than 1 GB, then in fresh child processes (so each peak RSS
is its own) converts it (a) with ``magseg_hpc.volume.ingest.ingest`` (slab streaming) and
(b) the baseline: ``np.load`` the whole array, then write it to the same zarr layout.
Prints a markdown table and writes it, with the commit, command and raw numbers, to
``benchmarks/results/ingest.md`` (and ``ingest.json``). Usage:

    .venv/bin/python benchmarks/bench_ingest.py [--shape 512,768,768] [--workdir /tmp/bench]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
from _results import write_results

CHILD = r"""
import json, sys, time
import numpy as np
mode, src, out = sys.argv[1:4]
t0 = time.perf_counter()
if mode == "ingest":
    from magseg_hpc.volume.ingest import ingest
    ingest(src, out, chunks=(32, 256, 256))
else:
    from magseg_hpc.volume.store import write_image_store
    volume = np.load(src)  # the whole volume in memory
    write_image_store(out, volume, chunks=(32, 256, 256))
seconds = time.perf_counter() - t0
# VmHWM, not ru_maxrss: Linux carries ru_maxrss over fork and exec, so a child would report
# at least the parent's peak (the parent maps the whole source volume to make it)
peak = next(int(line.split()[1]) * 1024 for line in open("/proc/self/status")
            if line.startswith("VmHWM:"))
print(json.dumps({"seconds": seconds, "peak_rss": peak}))
"""


def make_source(path: Path, shape: tuple[int, int, int]) -> None:
    """A smooth, noisy volume (compresses like a reconstruction), written slab by slab."""
    mm = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=shape)
    rng = np.random.default_rng(0)
    y, x = np.mgrid[: shape[1], : shape[2]].astype(np.float32)
    for z in range(shape[0]):
        mm[z] = np.sin(x / 17 + z / 11) * np.cos(y / 23) + rng.normal(0, 0.3, shape[1:])
    mm.flush()


def run(mode: str, src: Path, out: Path) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    r = subprocess.run([sys.executable, "-c", CHILD, mode, str(src), str(out)],
                       capture_output=True, text=True, check=True)
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="512,768,768")
    ap.add_argument("--workdir", default="/tmp/magseg-bench-ingest")
    args = ap.parse_args()
    shape = tuple(int(v) for v in args.shape.split(","))
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    src = work / "volume.npy"
    if not src.exists() or np.load(src, mmap_mode="r").shape != shape:
        make_source(src, shape)
    quarter = work / "quarter.npy"
    if not quarter.exists() or np.load(quarter, mmap_mode="r").shape[0] != shape[0] // 4:
        np.save(quarter, np.load(src, mmap_mode="r")[: shape[0] // 4])
    nbytes = int(np.prod(shape)) * 4
    rows = {
        "ingest (streaming)": (run("ingest", src, work / "out.zarr"), nbytes),
        "ingest, 1/4 of the volume": (run("ingest", quarter, work / "out.zarr"), nbytes // 4),
        "numpy load + write (baseline)": (run("numpy", src, work / "out.zarr"), nbytes),
    }
    shutil.rmtree(work / "out.zarr", ignore_errors=True)
    lines = [f"Volume {'x'.join(map(str, shape))} float32 = {nbytes / 2**30:.2f} GiB "
             "(NPY), written to zarr chunks (32, 256, 256); each path in its own child process.",
             "",
             "| path | seconds | MB/s | peak RSS (MiB) | peak RSS / volume |",
             "|---|---|---|---|---|"]
    for name, (r, size) in rows.items():
        lines.append(f"| {name} | {r['seconds']:.1f} | {size / 1e6 / r['seconds']:.0f} | "
                     f"{r['peak_rss'] / 2**20:.0f} | {r['peak_rss'] / size:.2f} |")
    ingest, base = rows["ingest (streaming)"][0], rows["numpy load + write (baseline)"][0]
    quarter_rss = rows["ingest, 1/4 of the volume"][0]["peak_rss"]
    ratios = {"throughput_ingest_over_baseline": base["seconds"] / ingest["seconds"],
              "peak_rss_ingest_over_baseline": ingest["peak_rss"] / base["peak_rss"],
              "peak_rss_full_over_quarter": ingest["peak_rss"] / quarter_rss}
    lines += ["",
              f"Throughput ingest / baseline: "
              f"{ratios['throughput_ingest_over_baseline']:.2f}x; peak memory ingest / "
              f"baseline: {ratios['peak_rss_ingest_over_baseline']:.2f}; peak memory of "
              f"ingest, full / quarter volume: {ratios['peak_rss_full_over_quarter']:.2f}."]
    body = "\n".join(lines)
    print(body)
    raw = {"shape": list(shape), "volume_bytes": nbytes,
           "runs": {name: {**r, "bytes": size} for name, (r, size) in rows.items()},
           "ratios": ratios}
    print("\nwrote", write_results("ingest", "Ingest: streaming vs numpy load + write", body,
                                   raw))


if __name__ == "__main__":
    main()
