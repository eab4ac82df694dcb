"""segment-volume on a small volume: its worker in this process (the default up to 256 MiB)
against a worker process (--workers 1), end to end as a user runs the command.

Each repetition runs both, interleaved, in fresh interpreters; the ratio is of the medians.

    .venv/bin/python benchmarks/bench_startup.py --volume test.zarr --model best.pt
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _results import ROOT, write_results  # noqa: E402

VARIANTS = {"in this process (default)": [], "worker process (--workers 1)": ["--workers", "1"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--volume", required=True, help="a small volume (<= 256 MiB)")
    p.add_argument("--model", required=True, help="a checkpoint (best.pt)")
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args()
    seconds: dict[str, list[float]] = {name: [] for name in VARIANTS}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(a.repeats):
            for name, extra in VARIANTS.items():
                out = Path(tmp) / f"out{r}.zarr"
                started = time.perf_counter()
                subprocess.run([sys.executable, "-m", "magseg_hpc.cli", "segment-volume",
                                a.volume, str(out), "--model", a.model, "--dashboard-address",
                                ":0", *extra], cwd=ROOT, check=True, capture_output=True)
                seconds[name].append(time.perf_counter() - started)
                shutil.rmtree(out)
    medians = {name: statistics.median(v) for name, v in seconds.items()}
    inproc, worker = medians.values()
    lines = ["| variant | wall time per run (s), median | runs |", "|---|---|---|"]
    lines += [f"| {name} | {medians[name]:.1f} | {', '.join(f'{s:.1f}' for s in v)} |"
              for name, v in seconds.items()]
    body = "\n".join([f"Volume `{a.volume}`, model `{a.model}`.", "", *lines, "",
                      f"Worker process / in this process: **{worker / inproc:.2f}x**."])
    print(write_results("startup", "segment-volume start-up on a small volume", body,
                        {"seconds": seconds, "medians": medians}))


if __name__ == "__main__":
    main()
