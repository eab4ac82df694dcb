"""segment-volume benchmarks: pipeline efficiency, peak memory vs volume size, throughput.

1. Efficiency: end-to-end ``segment_volume`` wall time (1 worker process, 1 torch thread,
   cluster already started, model load included) against the pure model forward over the
   same slices (same batch size, the same 1 thread, already-normalised tensors, no I/O), both
   measured in the same worker process right after each pipeline run (best of 3 each).
   efficiency = forward / end-to-end (target >= 0.9).
2. Memory: peak RSS of the worker process (fresh cluster per volume, ru_maxrss) and of the
   client, for a volume and one 4x larger (4x the slices, same slab size).
3. Throughput: voxels/s for DeepLabV3+ ResNet-18 and ResNet-101 (random weights: speed does
   not depend on them), with 1 worker x 1 thread, 2 workers x 1 thread, 1 worker x 2 threads.

The machine is shared: numbers vary with other people's load. Usage:

    .venv/bin/python benchmarks/bench_segment.py [--workdir /tmp/bench_segment] [--quick]
"""

from __future__ import annotations

import argparse
import logging
import os
import resource
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from segment_utils import make_volume, write_input  # noqa: E402

from magseg_hpc.classes import ClassTable  # noqa: E402
from magseg_hpc.segment.pipeline import (  # noqa: E402
    SegmentOptions,
    prepare,
    segment_volume,
    warm_workers,
)


def make_ckpt(path: Path, backbone: str) -> Path:
    from magseg_hpc.models import build_model
    from magseg_hpc.models.checkpoint import save_checkpoint

    cfg = {"name": "deeplabv3plus", "backbone": backbone, "num_classes": 3, "in_channels": 1,
           "pretrained": None}
    torch.manual_seed(0)
    state = build_model(cfg).state_dict()
    save_checkpoint(path, {"model": cfg, "class_table": ClassTable.default().to_dict(),
                           "normalization": {"low": -2.0, "high": 2.0, "mean": 0.5, "std": 0.25},
                           "student": state, "teacher": state})
    return path


def pure_forward_seconds(ckpt: Path, volume: np.ndarray, batch: int, threads: int) -> float:
    from magseg_hpc.data.normalize import apply_normalization
    from magseg_hpc.models.checkpoint import load_inference_model

    torch.set_num_threads(threads)
    model, meta = load_inference_model(ckpt)
    x = torch.from_numpy(np.asarray(apply_normalization(volume, meta["normalization"]),
                                    np.float32))[:, None]
    with torch.inference_mode():
        model(x[:1])  # warm-up, as the pipeline's first batch is not
        t0 = time.perf_counter()
        for i in range(0, len(x), batch):
            model(x[i:i + batch])
    return time.perf_counter() - t0


def worker_forward_seconds(ckpt: str, inp: str, batch: int, threads: int) -> float:
    """Pure forward over every z slice, in the worker process (input read beforehand)."""
    from magseg_hpc.volume.io import open_volume

    volume = np.asarray(open_volume(inp).data.compute(scheduler="synchronous"))
    return pure_forward_seconds(Path(ckpt), volume, batch, threads)


def run_pipeline(ckpt, inp, out, workers, threads, slab, batch, repeats=1):
    from distributed import Client, LocalCluster

    shutil.rmtree(out, ignore_errors=True)
    with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                      dashboard_address=":0", silence_logs=logging.ERROR) as cluster, \
            Client(cluster) as client:
        prep = prepare(SegmentOptions(str(inp), str(out), model=str(ckpt), slab_size=slab,
                                      batch_size=batch, torch_threads=threads))
        startup = warm_workers(prep, client)  # worker imports + model load, reported apart
        times, forwards = [], []
        for _ in range(repeats):  # alternate, best of each: the machine is shared and noisy
            shutil.rmtree(out, ignore_errors=True)
            t0 = time.perf_counter()
            summary = segment_volume(prep, client, progress=False)
            times.append(time.perf_counter() - t0)
            if repeats > 1:
                forwards.append(client.submit(worker_forward_seconds, str(ckpt), str(inp), batch,
                                              threads, pure=False).result())
        peaks = client.run(lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    return min(times), summary, max(peaks.values()), startup, min(forwards, default=None)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", default="/tmp/bench_segment")
    ap.add_argument("--quick", action="store_true", help="smaller volumes")
    args = ap.parse_args()
    work = Path(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    cores = len(os.sched_getaffinity(0))
    side = 128 if args.quick else 192
    small_z = 48 if args.quick else 96
    # One torch thread for the efficiency/memory rows: on a loaded shared machine OpenMP teams
    # of 2 threads stall on each other (measured 3-10x slower than 1 thread at load 6 on 2 cores).
    slab, batch, threads = 4, 4, 1
    r18 = make_ckpt(work / "r18.pt", "resnet18")
    r101 = make_ckpt(work / "r101.pt", "resnet101")
    rows = []

    # 1. efficiency
    vol = make_volume((small_z, side, side), seed=0)
    inp = write_input(work / "small.zarr", vol, (8, 64, 64))
    # With segment-volume's default slab and batch sizes, as users run it.
    defaults = SegmentOptions("", "")
    e2e, _, _, startup, fwd = run_pipeline(r18, inp, work / "o1.zarr", 1, threads,
                                           defaults.slab_size, defaults.batch_size, repeats=3)
    rows.append((f"efficiency (resnet18, slab {defaults.slab_size}, batch {defaults.batch_size})",
                 f"{small_z}x{side}x{side}", f"1x{threads}",
                 f"pipeline {e2e:.2f} s (+{startup:.1f} s worker start-up), forward {fwd:.2f} s",
                 f"**{fwd / e2e:.2f}** ({fwd / (e2e + startup):.2f} with start-up)"))

    # 2. memory: 4x the slices
    big = make_volume((4 * small_z, side, side), seed=1)
    inp_big = write_input(work / "big.zarr", big, (8, 64, 64))
    _, _, peak_small, _, _ = run_pipeline(r18, inp, work / "o1.zarr", 1, threads, slab, batch)
    _, _, peak_big, _, _ = run_pipeline(r18, inp_big, work / "o2.zarr", 1, threads, slab, batch)
    rows.append(("worker peak RSS", f"{small_z} vs {4 * small_z} slices", f"1x{threads}",
                 f"{peak_small / 2**20:.0f} MiB vs {peak_big / 2**20:.0f} MiB",
                 f"**{peak_big / peak_small - 1:+.1%}**"))

    # 3. throughput
    for name, ckpt, shape in (("resnet18", r18, (16, side, side)),
                              ("resnet101", r101, (8, 128, 128))):
        v = make_volume(shape, seed=2)
        src = write_input(work / f"{name}.zarr", v, (8, 64, 64))
        for workers, t in ((1, 1), (2, 1), (1, 2)):
            secs, _, _, _, _ = run_pipeline(ckpt, src, work / f"t-{name}-{workers}x{t}.zarr",
                                            workers, t,
                                      slab if name == "resnet18" else 2, batch)
            rows.append((f"throughput {name}", "x".join(map(str, shape)), f"{workers}x{t}",
                         f"{secs:.2f} s", f"**{np.prod(shape) / secs:,.0f} voxels/s**"))

    print(f"\nsegment-volume benchmark on {cores} CPU cores (shared machine), torch "
          f"{torch.__version__}; memory and throughput rows: slab {slab}, batch {batch}\n")
    print("| measure | volume | workers x threads | measured | result |")
    print("|---|---|---|---|---|")
    for r in rows:
        print("| " + " | ".join(r) + " |")


if __name__ == "__main__":
    main()
