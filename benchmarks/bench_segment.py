"""segment-volume benchmarks: pipeline efficiency, peak memory vs volume size, throughput.

1. Efficiency: the pure model forward over every slice (same batch size, the same 1 thread,
   already-normalised tensors, no I/O; measured in the worker process right after each
   pipeline run, best of 3) against
   - steady state: ``segment_volume`` wall time with the cluster started and the model loaded
     (1 worker process, 1 torch thread; best of 3), target >= 0.9;
   - end to end, in process: cluster start + ``prepare`` + model load on the worker
     (``warm_workers``) + the first ``segment_volume`` run;
   - end to end, command line: wall time of ``magseg-hpc segment-volume`` as a user runs it
     (interpreter start, imports, cluster, model load, segmentation, shutdown).
2. Memory: peak RSS (VmHWM) of the worker process and of the client process, for a volume
   and one 4x larger (4x the slices, same slab size); each run in a fresh child process with
   a fresh cluster, so each peak is its own.
3. Throughput: voxels/s for DeepLabV3+ ResNet-18 and ResNet-101 (random weights: speed does
   not depend on them), with 1 worker x 1 thread, 2 workers x 1 thread, 1 worker x 2 threads.

The machine is shared: numbers vary with other people's load. Writes the table, the commit,
the command and the raw numbers to ``benchmarks/results/segment.md`` (and ``segment.json``).
Usage:

    .venv/bin/python benchmarks/bench_segment.py [--workdir /tmp/bench_segment] [--quick]
        [--memory-shape Z,Y,X]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from _results import write_results  # noqa: E402
from segment_utils import make_volume, write_input  # noqa: E402

from magseg_hpc.classes import ClassTable  # noqa: E402
from magseg_hpc.segment.pipeline import (  # noqa: E402
    SegmentOptions,
    prepare,
    segment_volume,
    warm_workers,
)


def make_ckpt(path: Path, backbone: str, **model) -> Path:
    """A random-weight checkpoint (speed and memory do not depend on the weights); ``model``:
    other model keys, e.g. cpu_best's context_slices=5, decoder_channels=64."""
    from magseg_hpc.models import build_model
    from magseg_hpc.models.checkpoint import save_checkpoint

    cfg = {"name": "deeplabv3plus", "backbone": backbone, "num_classes": 3, "in_channels": 1,
           "pretrained": None, **model}
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


def peak_rss() -> int:
    """This process's peak resident memory in bytes (VmHWM).

    Not ru_maxrss: Linux carries it over fork and exec, so a worker spawned by a client that
    had built large arrays would report at least the client's peak.
    """
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def run_pipeline(ckpt, inp, out, workers, threads, slab, batch, repeats=1) -> dict:
    """Segment ``inp`` on a fresh local cluster; times of each phase, peak RSS of the workers."""
    from distributed import Client, LocalCluster

    shutil.rmtree(out, ignore_errors=True)
    t_begin = time.perf_counter()
    with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                      dashboard_address=":0", silence_logs=logging.ERROR) as cluster, \
            Client(cluster) as client:
        cluster_s = time.perf_counter() - t_begin
        t0 = time.perf_counter()
        # ckpt None: --method threshold, the same slab pipeline without a model
        prep = prepare(SegmentOptions(str(inp), str(out), model=str(ckpt) if ckpt else None,
                                      method="model" if ckpt else "threshold", slab_size=slab,
                                      batch_size=batch, torch_threads=threads))
        prepare_s = time.perf_counter() - t0
        startup = warm_workers(prep, client)  # worker imports + model load, reported apart
        times, forwards = [], []
        for _ in range(repeats):  # alternate, best of each: the machine is shared and noisy
            shutil.rmtree(out, ignore_errors=True)
            t0 = time.perf_counter()
            segment_volume(prep, client, progress=False)
            times.append(time.perf_counter() - t0)
            if repeats > 1:
                forwards.append(client.submit(worker_forward_seconds, str(ckpt), str(inp), batch,
                                              threads, pure=False).result())
        peaks = client.run(peak_rss)
    return {"seconds": min(times), "seconds_all": times, "cluster_start_s": cluster_s,
            "prepare_s": prepare_s, "model_load_s": startup,
            "first_run_end_to_end_s": cluster_s + prepare_s + startup + times[0],
            "worker_peak_rss": max(peaks.values()),
            "forward_s": min(forwards, default=None), "forward_s_all": forwards}


def memory_child(ckpt, inp, out, slab, batch, threads) -> None:
    """In a fresh process: one run; prints worker and client (this process) peak RSS."""
    r = run_pipeline(None if ckpt == "-" else ckpt, inp, Path(out), 1, threads, slab, batch)
    r["client_peak_rss"] = peak_rss()
    print(json.dumps(r))


def run_memory(ckpt, inp, out, slab, batch, threads) -> dict:
    r = subprocess.run([sys.executable, __file__, "--memory-child", str(ckpt or "-"), str(inp),
                        str(out), str(slab), str(batch), str(threads)],
                       capture_output=True, text=True, check=True)
    return json.loads(r.stdout.strip().splitlines()[-1])


def cli_seconds(ckpt, inp, out, slab, batch, threads) -> float:
    """Wall time of ``magseg-hpc segment-volume`` as a user runs it, 1 worker x ``threads``."""
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "magseg_hpc.cli", "segment-volume", str(inp), str(out),
                    "--model", str(ckpt), "--slab-size", str(slab), "--batch-size", str(batch),
                    "--workers", "1", "--threads-per-worker", str(threads)],
                   capture_output=True, text=True, check=True)
    return time.perf_counter() - t0


def model_rows(args, work, side, small_z, mem_shape, slab, batch, threads, r18, r101,
               rows, raw) -> None:
    # 1. efficiency
    vol = make_volume((small_z, side, side), seed=0)
    inp = write_input(work / "small.zarr", vol, (8, 64, 64))
    del vol
    # With segment-volume's default slab and batch sizes, as users run it.
    defaults = SegmentOptions("", "")
    eff = run_pipeline(r18, inp, work / "o1.zarr", 1, threads, defaults.slab_size,
                       defaults.batch_size, repeats=3)
    fwd, e2e = eff["forward_s"], eff["seconds"]
    first = eff["first_run_end_to_end_s"]
    cli = cli_seconds(r18, inp, work / "o-cli.zarr", defaults.slab_size, defaults.batch_size,
                      threads)
    eff.update(cli_s=cli, steady_state=fwd / e2e, end_to_end_in_process=fwd / first,
               end_to_end_cli=fwd / cli, slab=defaults.slab_size, batch=defaults.batch_size,
               shape=[small_z, side, side])
    raw["efficiency"] = eff
    where = (f"resnet18, slab {defaults.slab_size}, batch {defaults.batch_size}",
             f"{small_z}x{side}x{side}", f"1x{threads}")
    rows.append(("efficiency, steady state", *where,
                 f"forward {fwd:.2f} s / pipeline {e2e:.2f} s (best of 3, cluster up, "
                 "model loaded)", f"**{fwd / e2e:.2f}**"))
    rows.append(("efficiency, end to end in process", *where,
                 f"forward {fwd:.2f} s / {first:.2f} s = cluster start "
                 f"{eff['cluster_start_s']:.1f} + prepare {eff['prepare_s']:.1f} + model load "
                 f"{eff['model_load_s']:.1f} + first run {eff['seconds_all'][0]:.2f}",
                 f"**{fwd / first:.2f}**"))
    rows.append(("efficiency, end to end `magseg-hpc segment-volume`", *where,
                 f"forward {fwd:.2f} s / command wall time {cli:.2f} s", f"**{fwd / cli:.2f}**"))

    # 2. memory: 4x the slices, each run in its own process
    big_shape = (4 * mem_shape[0], *mem_shape[1:])
    mem_in = write_input(work / "mem_small.zarr", make_volume(mem_shape, seed=0), (8, 64, 64))
    inp_big = write_input(work / "big.zarr", make_volume(big_shape, seed=1), (8, 64, 64))
    m_small = run_memory(r18, mem_in, work / "o1.zarr", slab, batch, threads)
    m_big = run_memory(r18, inp_big, work / "o2.zarr", slab, batch, threads)
    raw["memory"] = {"small_shape": list(mem_shape), "big_shape": list(big_shape),
                     "small": m_small, "big": m_big}
    mib = 2**20
    vols = (f"{'x'.join(map(str, mem_shape))} vs {'x'.join(map(str, big_shape))} "
            f"({np.prod(mem_shape) * 4 / mib:.0f} vs {np.prod(big_shape) * 4 / mib:.0f} MiB)")
    for who in ("worker", "client"):
        a, b = m_small[f"{who}_peak_rss"], m_big[f"{who}_peak_rss"]
        rows.append((f"{who} peak RSS", f"resnet18, slab {slab}, batch {batch}", vols,
                     f"1x{threads}", f"{a / mib:.0f} MiB vs {b / mib:.0f} MiB",
                     f"**{b / a - 1:+.1%}**"))

    # 3. throughput
    raw["throughput"] = []
    for name, ckpt, shape in (("resnet18", r18, (16, side, side)),
                              ("resnet101", r101, (8, 128, 128))):
        v = make_volume(shape, seed=2)
        src = write_input(work / f"{name}.zarr", v, (8, 64, 64))
        s = slab if name == "resnet18" else 2
        for workers, t in ((1, 1), (2, 1), (1, 2)):
            secs = run_pipeline(ckpt, src, work / f"t-{name}-{workers}x{t}.zarr",
                                workers, t, s, batch)["seconds"]
            raw["throughput"].append({"model": name, "shape": list(shape), "workers": workers,
                                      "threads": t, "slab": s, "seconds": secs,
                                      "voxels_per_s": float(np.prod(shape) / secs)})
            rows.append((f"throughput {name}", f"slab {s}, batch {batch}",
                         "x".join(map(str, shape)), f"{workers}x{t}", f"{secs:.2f} s",
                         f"**{np.prod(shape) / secs:,.0f} voxels/s**"))


def big_memory_rows(work: Path, shape: tuple[int, int, int], rows, raw,
                    ckpt: Path | None = None, threads: int = 1) -> None:
    """Client and worker peak RSS on a volume and 4x its slices: the threshold pipeline, or
    with ``ckpt`` the model (z slices only, precision auto)."""
    from bench_ingest import make_source

    from magseg_hpc.volume.ingest import ingest

    mib, gib = 2**20, 2**30
    method = "model" if ckpt else "threshold"
    out, shapes = {}, {"small": shape, "big": (4 * shape[0], *shape[1:])}
    for key, shp in shapes.items():
        npy, store = work / f"{method}_{key}.npy", work / f"{method}_{key}.zarr"
        make_source(npy, shp)
        ingest(npy, store, chunks=(16, 256, 256))
        npy.unlink()
        out[key] = run_memory(ckpt, store, work / f"{method}_{key}_out.zarr", 16, 8, threads)
        out[key]["bytes"] = int(np.prod(shp)) * 4
        print(key, json.dumps(out[key]), flush=True)
        shutil.rmtree(store)
        shutil.rmtree(work / f"{method}_{key}_out.zarr", ignore_errors=True)
    raw[f"big_memory_{method}"] = {"small_shape": list(shapes["small"]),
                                   "big_shape": list(shapes["big"]), "threads": threads, **out}
    vols = " vs ".join(f"{'x'.join(map(str, shapes[k]))} ({out[k]['bytes'] / gib:.2f} GiB)"
                       for k in ("small", "big"))
    what = "cpu_best's model, slab 16, batch 8" if ckpt else "threshold, slab 16"
    for who in ("worker", "client"):
        a, b = out["small"][f"{who}_peak_rss"], out["big"][f"{who}_peak_rss"]
        rows.append((f"{who} peak RSS, --method {method}", what, vols, f"1x{threads}",
                     f"{a / mib:.0f} MiB vs {b / mib:.0f} MiB "
                     f"({out['small']['seconds']:.0f} s vs {out['big']['seconds']:.0f} s)",
                     f"**{b / a - 1:+.1%}**"))


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--memory-child":
        ckpt, inp, out, slab, batch, threads = sys.argv[2:8]
        memory_child(ckpt, inp, out, int(slab), int(batch), int(threads))
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", default="/tmp/bench_segment")
    ap.add_argument("--quick", action="store_true", help="smaller volumes")
    ap.add_argument("--memory-shape", default=None,
                    help="Z,Y,X of the smaller memory volume; the larger has 4x Z "
                         "(default 48,128,128 with --quick, else 96,192,192)")
    ap.add_argument("--big-memory", default=None, metavar="Z,Y,X",
                    help="also: client and worker peak RSS of --method threshold (the same slab "
                         "pipeline, no model) on a float32 volume of this shape and one with 4x "
                         "Z, made and ingested slab by slab (256,1024,1024 is 1 GiB)")
    ap.add_argument("--big-memory-method", choices=("threshold", "model"), default="threshold",
                    help="with --big-memory: the threshold pipeline (1 worker x 1 thread), or "
                         "cpu_best's model (random weights, z slices, --precision auto, "
                         "1 worker x 2 threads)")
    ap.add_argument("--skip-model-rows", action="store_true",
                    help="only the --big-memory rows (the efficiency, memory and throughput "
                         "rows of the model are left out)")
    ap.add_argument("--results", default="segment",
                    help="results file name under benchmarks/results/ (default segment)")
    args = ap.parse_args()
    work = Path(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    cores = len(os.sched_getaffinity(0))
    side = 128 if args.quick else 192
    small_z = 48 if args.quick else 96
    mem_shape = (tuple(int(v) for v in args.memory_shape.split(",")) if args.memory_shape
                 else (small_z, side, side))
    # One torch thread for the efficiency/memory rows: on a loaded shared machine OpenMP teams
    # of 2 threads stall on each other.
    slab, batch, threads = 4, 4, 1
    r18 = make_ckpt(work / "r18.pt", "resnet18")
    r101 = make_ckpt(work / "r101.pt", "resnet101")
    rows, raw = [], {"quick": args.quick, "cores": cores, "slab": slab, "batch": batch}

    if not args.skip_model_rows:
        model_rows(args, work, side, small_z, mem_shape, slab, batch, threads, r18, r101,
                   rows, raw)
    if args.big_memory:
        shape = tuple(int(v) for v in args.big_memory.split(","))
        if args.big_memory_method == "model":
            cpu_best = make_ckpt(work / "cpu_best.pt", "resnet18", context_slices=5,
                                 decoder_channels=64)
            big_memory_rows(work, shape, rows, raw, cpu_best, threads=2)
        else:
            big_memory_rows(work, shape, rows, raw)

    lines = [f"segment-volume benchmark on {cores} usable CPU cores (shared machine), torch "
             f"{torch.__version__}; random-weight DeepLabV3+ checkpoints. Efficiency = pure "
             "model forward time over the same slices / wall time.", "",
             "| measure | model, slab, batch | volume | workers x threads | measured | result |",
             "|---|---|---|---|---|---|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    body = "\n".join(lines)
    print(body)
    print("\nwrote", write_results(args.results, "segment-volume benchmark", body, raw))


if __name__ == "__main__":
    main()
