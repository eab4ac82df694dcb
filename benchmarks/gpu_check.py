"""The study's scale on one accelerator (issue 14): one script, one GPU, a hard time budget.

Sections, each through the project's own code paths, each skipped (and said so) once the
budget is spent:

1. augseg: ``magseg_hpc.train.steps.augseg_step`` + the EMA update at the study's settings
   (configs/augseg_semi128.yaml: DeepLabV3+ ResNet-101 deep stem, OS16, crop 513, 8 labelled
   + 8 unlabelled per GPU, bf16 autocast), batches from the project's loader over a phantom
   (pre-loaded: data loading is timed apart). Variants: eager, channels_last,
   cudnn.benchmark (GPU only; the project leaves it off), torch.compile (guarded: a compile
   failure is noted and the variant skipped). ms per iteration, images/s
   (labelled + unlabelled, as the loop counts), peak GPU memory, FLOPs per iteration
   (``torch.utils.flop_counter.FlopCounterMode``) and the share of the bf16 peak, and the
   projected wall time of the study's 30 epochs over 2298 unlabelled slices on 1 and 2 GPUs.
   CUDA graphs are not tried: the step reads ``.item()`` and branches on a CPU generator.
2. supervised: ``supervised_step`` at the same settings (eager and channels_last).
3. sam: SAM ViT-B (configs/sam_vit_b.yaml, random weights, no download) through
   ``build_models`` + ``supervised_step`` at batch 2 and 8, 1024 x 1024.
4. segment: segment-volume (``magseg_hpc.segment.pipeline``: prepare + segment_volume on a
   local Dask cluster from ``open_cluster``) with a random-weight ResNet-101 checkpoint over a
   213 x 600 x 600 synthetic volume written with ``write_image_store``, bf16 (``--bf16``), at
   batch 8/16/32: voxels/s end to end against the pure forward over the same slices in the
   same worker process, their ratio, and the share of the bf16 peak the forward reaches.

Writes OUT/gpu.md and OUT/gpu.json with the commit and the command line.

    # on a GPU machine (about 8 minutes):
    python benchmarks/gpu_check.py [--budget-s 480] [--peak-tflops 790]
    # the same code paths, tiny, on CPU (CI runs this through tests/test_gpu_check.py):
    python benchmarks/gpu_check.py --smoke --out /tmp/gpu_smoke
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import torch

from magseg_hpc.precision import resolve_precision

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = ("augseg", "supervised", "sam", "segment")
STUDY = {"epochs": 30, "n_labeled": 128, "n_unlabeled": 2298}

FULL = {
    "device": "cuda", "config": "configs/augseg_semi128.yaml", "backbone": "resnet101",
    "crop": 513, "batch": 8, "phantom": (32, 600, 600), "n_labeled": 8, "n_val": 2,
    "sam_config": "configs/sam_vit_b.yaml", "sam_model": "sam_vit_b", "sam_size": 1024,
    "sam_batches": (2, 8), "volume": (213, 600, 600), "seg_batches": (8, 16, 32),
    "seg_backbone": "resnet101", "warmup": 3, "repeats": 10, "loader_batches": 4,
    "compile_backend": "inductor", "min_section_s": 20.0, "seg_processes": True,
    "compile_min_left_s": 240.0, "seg_overlap": (2, 16), "train_overrides": [],
    "seg_forward_repeats": 2,
}
SMOKE = {
    "device": "cpu", "config": "configs/augseg_semi128.yaml", "backbone": "resnet10",
    "crop": 64, "batch": 2, "phantom": (10, 64, 64), "n_labeled": 4, "n_val": 2,
    "sam_config": "configs/cpu_tiny_sam.yaml", "sam_model": "sam_tiny", "sam_size": 64,
    "sam_batches": (2,), "volume": (8, 64, 64), "seg_batches": (2, 4),
    "seg_backbone": "resnet10", "warmup": 0, "repeats": 1, "loader_batches": 2,
    # dynamo tracing without inductor's C++ build: the guarded path, quickly
    "compile_backend": "eager", "min_section_s": 0.0, "compile_min_left_s": 0.0,
    "train_overrides": ["model.decoder_channels=32"],  # a narrow head: a faster CPU step
    "seg_overlap": (2, 2), "seg_forward_repeats": 1,
    # Dask workers as threads of this process (segment-volume --in-process): no worker
    # start-up of several seconds; the full run uses worker processes as users do
    "seg_processes": False,
}


# --- helpers ---------------------------------------------------------------------------------


class Budget:
    def __init__(self, seconds: float, min_section_s: float):
        self.t0, self.seconds, self.min_section_s = time.perf_counter(), seconds, min_section_s

    def left(self) -> float:
        return self.seconds - (time.perf_counter() - self.t0)

    def allows(self, need: float | None = None) -> bool:
        return self.left() > (self.min_section_s if need is None else need)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> float | None:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return None


def time_calls(fn, n_warmup: int, n_repeats: int, device: torch.device,
               budget: Budget) -> list[float]:
    """Seconds of each timed call (median reported); stops early when the budget is spent."""
    for i in range(n_warmup):
        fn(i)
    sync(device)
    times = []
    for i in range(n_repeats):
        t0 = time.perf_counter()
        fn(n_warmup + i)
        sync(device)
        times.append(time.perf_counter() - t0)
        if times and budget.left() < 0:
            break
    return times


def count_flops(fn) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def git_commit() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                             text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=ROOT, capture_output=True, text=True).stdout.strip()
        return sha + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def fmt(v, spec: str = ".1f", none: str = "n/a") -> str:
    return none if v is None else format(v, spec)


# --- training sections -----------------------------------------------------------------------


def write_training_store(path: Path, shape: tuple[int, int, int]) -> None:
    """An image + labels store (write_image_store) with blocky classes and noise: cheap to
    make at 600 x 600, unlike a phantom; the step's cost does not depend on the content."""
    from magseg_hpc.classes import ClassTable
    from magseg_hpc.volume.store import write_image_store

    rng = np.random.default_rng(0)
    z, h, w = shape
    block = max(1, min(h, w) // 16)
    coarse = rng.integers(0, 3, (z, -(-h // block), -(-w // block)), dtype=np.uint8)
    labels = np.ascontiguousarray(
        coarse.repeat(block, axis=1).repeat(block, axis=2)[:, :h, :w])
    image = (labels.astype(np.float32) + 0.5 * rng.standard_normal(shape, dtype=np.float32))
    write_image_store(path, image, labels=labels, class_table=ClassTable.default(),
                      overwrite=True)


def train_setup(s: dict, tmp: Path, overrides: list[str]):
    """(cfg, env, labelled batches, unlabelled batches, loader timing) from the project's
    loader over a synthetic image + labels store, as benchmarks/bench_train_step.py does."""
    from magseg_hpc.config import load_config
    from magseg_hpc.data.sampling import iters_per_epoch as ipe_of
    from magseg_hpc.data.slices import LabeledSlices, UnlabeledSlices
    from magseg_hpc.train import distributed as dist_util
    from magseg_hpc.train.setup import (
        StepBatches,
        augment_settings,
        fit_data_normalization,
        make_loader,
        open_data,
    )
    from magseg_hpc.train.steps import with_resolved_precision

    vol = tmp / "train.zarr"
    if not vol.exists():
        write_training_store(vol, s["phantom"])
    cfg = load_config(ROOT / s["config"], [
        f"data.volume={vol}", f"train.device={s['device']}", "data.num_workers=0",
        f"data.n_labeled={s['n_labeled']}", f"data.n_val={s['n_val']}",
        f"model.backbone={s['backbone']}", f"train.crop_size={s['crop']}",
        f"train.batch_size={s['batch']}", "train.precision=auto", *s["train_overrides"],
        *overrides])
    env = dist_util.init_distributed(cfg.train.device)
    cfg = with_resolved_precision(cfg, env.device)  # train.precision auto, as training does
    t = cfg.train
    out = tmp / f"run-{len(list(tmp.glob('run-*')))}"
    data = open_data(cfg, out, env)
    norm = fit_data_normalization(cfg, data)
    aug = augment_settings(cfg)
    labeled = LabeledSlices(data.source, data.splits["labeled"], norm, aug, cfg.seed)
    unlabeled = UnlabeledSlices(data.source, data.splits["unlabeled"], norm, aug, cfg.seed)
    ipe = ipe_of(len(labeled), len(data.splits["unlabeled"]), t.batch_size, 1)
    start, n = t.sup_only_epochs * ipe, s["loader_batches"]
    plan_kw = {"n_labeled": len(labeled), "n_unlabeled": len(data.splits["unlabeled"]),
               "batch_size": t.batch_size, "seed": cfg.seed, "rank": 0, "world_size": 1}
    t0 = time.perf_counter()
    lab = list(make_loader(labeled, StepBatches("labeled", start, start + n, ipe, plan_kw),
                           cfg, env))
    unl = list(make_loader(unlabeled, StepBatches("unlabeled", start, start + n, ipe, plan_kw),
                           cfg, env))
    loader_s = time.perf_counter() - t0
    loader = {"batches": n, "images": 2 * n * t.batch_size, "seconds": loader_s,
              "ms_per_step_of_batches": 1e3 * loader_s / n,
              "images_per_s": 2 * n * t.batch_size / loader_s,
              "note": "project loader, num_workers 0 (one CPU process), labelled + "
                      "unlabelled (weak + strong views) crops"}
    return cfg, env, lab, unl, loader


def measure_train(kind: str, variant: str, cfg, env, lab, unl, s: dict, budget: Budget,
                  peak_tflops: float, notes: list[str]) -> dict:
    from magseg_hpc.data.sampling import step_generator
    from magseg_hpc.train.augseg import ema_update
    from magseg_hpc.train.setup import build_models, build_optimizer, effective_lr
    from magseg_hpc.train.steps import augseg_step, supervised_step

    t, dev = cfg.train, env.device
    if variant == "compile" and not budget.allows(s["compile_min_left_s"]):
        notes.append(f"{kind} torch.compile skipped: under {s['compile_min_left_s']:.0f} s "
                     "of the budget left")
        return {"variant": variant, "status": "skipped: too little time left to compile"}
    reset_peak(dev)
    student, teacher = build_models(cfg, env)
    optimizer = build_optimizer(cfg, student, effective_lr(cfg, 1))
    run_s, run_t = student, teacher
    if variant == "channels_last":
        student.to(memory_format=torch.channels_last)
        teacher.to(memory_format=torch.channels_last)
    elif variant == "compile":
        run_s = torch.compile(student, backend=s["compile_backend"])
        run_t = torch.compile(teacher, backend=s["compile_backend"])
    torch.backends.cudnn.benchmark = variant == "cudnn_benchmark"
    epoch = t.sup_only_epochs
    nb = len(lab)

    def step(i: int):
        if kind == "augseg":
            augseg_step(run_s, run_t, optimizer, lab[i % nb], unl[i % nb], cfg=cfg, env=env,
                        epoch=epoch, generator=step_generator(cfg.seed, 0, i))
            ema_update(teacher, student, t.ema_decay)
        else:
            supervised_step(run_s, optimizer, lab[i % nb], cfg=cfg, env=env)

    row: dict = {"variant": variant}
    t0 = time.perf_counter()
    flops = None
    try:
        # first call: cudnn autotuning, compilation; eager counts the FLOPs on it
        if variant == "eager":
            flops = count_flops(lambda: step(0))
        else:
            step(0)
        sync(dev)
    except Exception as e:  # noqa: BLE001 - a variant that fails is reported, not fatal
        if variant != "compile":
            raise
        row.update(status="failed", error=f"{type(e).__name__}: {str(e).splitlines()[0][:200]}")
        notes.append(f"{kind} torch.compile failed ({row['error']}); eager is the fallback")
        torch._dynamo.reset()
        return row
    row["first_call_s"] = time.perf_counter() - t0
    times = time_calls(lambda i: step(i + 1), s["warmup"], s["repeats"], dev, budget)
    med = statistics.median(times)
    images = (2 if kind == "augseg" else 1) * t.batch_size
    row.update(status="done", iterations=len(times), ms_per_iter=1e3 * med,
               min_ms=1e3 * min(times), images_per_s=images / med,
               peak_mem_gib=peak_gib(dev))
    if flops is not None:
        row["tflop_per_iter"] = flops / 1e12
        row["share_of_peak"] = flops / med / (peak_tflops * 1e12)
    if variant == "compile":
        torch._dynamo.reset()
    torch.backends.cudnn.benchmark = False
    return row


def projection(ms_per_iter: float, batch: int) -> dict:
    from magseg_hpc.data.sampling import iters_per_epoch

    out = {}
    for gpus in (1, 2):
        ipe = iters_per_epoch(STUDY["n_labeled"], STUDY["n_unlabeled"], batch, gpus)
        iters = STUDY["epochs"] * ipe
        out[f"{gpus}_gpu"] = {"iters_per_epoch": ipe, "iterations": iters,
                              "minutes": iters * ms_per_iter / 1e3 / 60}
    return out


def section_train(kind: str, s: dict, tmp: Path, budget: Budget, args, notes) -> dict:
    overrides = [] if kind == "augseg" else ["train.method=supervised"]
    cfg, env, lab, unl, loader = train_setup(s, tmp, overrides)
    from magseg_hpc.train.setup import model_config

    m = model_config(cfg).resolved(masked=False)  # the norm is not reported
    res = {"settings": {"config": s["config"], "backbone": m.backbone,
                        "decoder_channels": m.decoder_channels,
                        "deep_stem": m.deep_stem, "output_stride": m.output_stride,
                        "crop": cfg.train.crop_size, "batch_per_gpu": cfg.train.batch_size,
                        "extra_weak": cfg.train.extra_weak, "precision": resolve_precision(
                            cfg.train.precision, env.device), "device": str(env.device)},
           "loader": loader, "variants": []}
    variants = ("eager", "channels_last", "cudnn_benchmark", "compile") if kind == "augseg" \
        else ("eager", "channels_last")
    for v in variants:
        if v == "cudnn_benchmark" and env.device.type != "cuda":
            res["variants"].append({"variant": v, "status": "skipped: CUDA only"})
            continue
        if not budget.allows():
            res["variants"].append({"variant": v, "status": "skipped: time budget spent"})
            continue
        res["variants"].append(measure_train(kind, v, cfg, env, lab, unl, s, budget,
                                             args.peak_tflops, notes))
    done = [r for r in res["variants"] if r.get("status") == "done"]
    if done:
        best = min(done, key=lambda r: r["ms_per_iter"])
        res["fastest"] = best["variant"]
        if kind == "augseg":
            res["projection"] = projection(best["ms_per_iter"], cfg.train.batch_size)
            res["projection_note"] = (
                f"{STUDY['epochs']} epochs x iters_per_epoch({STUDY['n_labeled']}, "
                f"{STUDY['n_unlabeled']}, {cfg.train.batch_size}, gpus) at the fastest "
                "variant's ms/iteration; 2 GPUs assume the same per-GPU step time (DDP "
                "all-reduce not measured); evaluation and data loading left out")
    return res


def sam_row(s: dict, b: int, budget: Budget, notes: list[str]) -> dict:
    """One SAM batch size; everything it allocates is freed on return."""
    from magseg_hpc.config import load_config
    from magseg_hpc.train import distributed as dist_util
    from magseg_hpc.train.setup import build_models, build_optimizer, effective_lr
    from magseg_hpc.train.steps import supervised_step, with_resolved_precision

    cfg = load_config(ROOT / s["sam_config"], [
        f"model.name={s['sam_model']}", "model.checkpoint=null",
        f"train.device={s['device']}", f"train.batch_size={b}", "train.precision=auto",
        f"train.crop_size={s['sam_size']}", "data.volume=unused.zarr"])
    env = dist_util.init_distributed(cfg.train.device)
    cfg = with_resolved_precision(cfg, env.device)
    dev = env.device
    row: dict = {"batch": b}
    try:
        reset_peak(dev)
        # student + frozen EMA teacher, as the training loop holds them
        student, teacher = build_models(cfg, env)
        optimizer = build_optimizer(cfg, student, effective_lr(cfg, 1))
        gen = torch.Generator().manual_seed(0)
        size = s["sam_size"]
        x = torch.randn((b, 1, size, size), generator=gen)
        y = torch.randint(0, 3, (b, size, size), generator=gen)

        def step(i):
            supervised_step(student, optimizer, (x, y), cfg=cfg, env=env)

        times = time_calls(step, s["warmup"], s["repeats"], dev, budget)
        med = statistics.median(times)
        row.update(status="done", iterations=len(times), ms_per_iter=1e3 * med,
                   images_per_s=b / med, peak_mem_gib=peak_gib(dev))
    except torch.cuda.OutOfMemoryError as e:
        row.update(status="failed: out of memory", error=str(e).splitlines()[0][:200])
        notes.append(f"SAM batch {b}: out of GPU memory")
    return row


def section_sam(s: dict, budget: Budget, args, notes) -> dict:
    res = {"settings": {"config": s["sam_config"], "model": s["sam_model"],
                        "weights": "random (no download)", "input": s["sam_size"]},
           "batches": []}
    for b in s["sam_batches"]:
        if not budget.allows():
            res["batches"].append({"batch": b, "status": "skipped: time budget spent"})
            continue
        res["batches"].append(sam_row(s, b, budget, notes))
        if s["device"] == "cuda":
            torch.cuda.empty_cache()
    return res


# --- segment-volume --------------------------------------------------------------------------


def make_ckpt(path: Path, backbone: str) -> Path:
    from magseg_hpc.classes import ClassTable
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


def worker_forward(ckpt: str, inp: str, batch: int, device: str, precision: str,
                   normalization: dict, repeats: int = 1) -> dict:
    """In the Dask worker: the pure forward over every z slice (normalised and on the device
    beforehand, no I/O), timed (best of ``repeats``), plus the FLOPs of one batch counted."""
    from magseg_hpc.data.normalize import apply_normalization
    from magseg_hpc.models.checkpoint import checkpoint_sha256
    from magseg_hpc.precision import autocast
    from magseg_hpc.segment.worker import get_model, resolve_device
    from magseg_hpc.volume.io import open_volume

    dev = resolve_device(device)
    model, _ = get_model(ckpt, checkpoint_sha256(ckpt), dev)
    volume = np.asarray(open_volume(inp).data.compute(scheduler="synchronous"))
    x = torch.from_numpy(np.asarray(apply_normalization(volume, normalization),
                                    np.float32))[:, None].to(dev)
    tdev = torch.device(dev)
    with torch.inference_mode(), autocast(dev, resolve_precision(precision, dev)):
        model(x[:batch])  # warm-up (the pipeline's workers were warmed too)
        seconds = float("inf")
        for _ in range(repeats):
            sync(tdev)
            t0 = time.perf_counter()
            for i in range(0, len(x), batch):
                torch.softmax(model(x[i:i + batch]).float(), dim=1)
            sync(tdev)
            seconds = min(seconds, time.perf_counter() - t0)
        flops = count_flops(lambda: model(x[:batch]))
    return {"seconds": seconds, "flops_per_slice": flops / min(batch, len(x)),
            "slices": int(len(x)), "device": dev}


def seg_run(prep, client, batch: int, workers: int, s: dict, args) -> dict:
    """One segment-volume run of the prepared volume at ``batch``, then the pure forward over
    the same slices in the same worker process."""
    import dataclasses

    from magseg_hpc.segment.pipeline import segment_volume, warm_workers

    prep.options = dataclasses.replace(prep.options, batch_size=batch)
    prep.provenance["options"]["batch_size"] = batch
    prep.job = dataclasses.replace(prep.job, batch_size=batch)
    shutil.rmtree(prep.job.output, ignore_errors=True)
    warm_s = warm_workers(prep, client)
    summary = segment_volume(prep, client, progress=False)
    fwd = client.submit(worker_forward, prep.job.model, prep.job.input, batch, prep.job.device,
                        prep.job.precision, prep.job.normalization, s["seg_forward_repeats"],
                        pure=False).result()
    voxels = int(np.prod(prep.volume.shape))
    fwd_vps = voxels / fwd["seconds"]
    achieved = fwd["flops_per_slice"] * fwd["slices"] / fwd["seconds"]
    stage = {k: sum(w[k] for w in summary.per_worker.values())
             for k in ("read_s", "compute_s", "write_s")}
    shutil.rmtree(prep.job.output, ignore_errors=True)
    return {
        "batch": batch, "workers": workers, "slab_size": prep.options.slab_size,
        "status": "done", "warm_up_s": warm_s,
        "end_to_end_s": summary.seconds, "voxels_per_s": summary.voxels_per_second,
        "forward_s": fwd["seconds"], "forward_voxels_per_s": fwd_vps,
        "ratio": summary.voxels_per_second / fwd_vps,
        "worker_read_s": stage["read_s"], "worker_compute_s": stage["compute_s"],
        "worker_write_s": stage["write_s"],
        "tflop_per_slice": fwd["flops_per_slice"] / 1e12, "forward_tflops": achieved / 1e12,
        "share_of_peak": achieved / (args.peak_tflops * 1e12)}


def section_segment(s: dict, tmp: Path, budget: Budget, args, notes) -> dict:
    from magseg_hpc.launch.dask_cluster import open_cluster
    from magseg_hpc.segment.pipeline import SegmentOptions, prepare
    from magseg_hpc.volume.store import write_image_store

    shape = s["volume"]
    t0 = time.perf_counter()
    volume = np.random.default_rng(0).standard_normal(shape, dtype=np.float32)
    inp = tmp / "volume.zarr"
    write_image_store(inp, volume, overwrite=True)
    del volume
    ckpt = make_ckpt(tmp / f"{s['seg_backbone']}.pt", s["seg_backbone"])
    device = s["device"]
    # one slab holds the largest batch; every run uses the same slabs (and one prepare)
    slab = max(16, *s["seg_batches"])
    prep = prepare(SegmentOptions(str(inp), str(tmp / "labels.zarr"), model=str(ckpt),
                                  batch_size=s["seg_batches"][0], slab_size=slab,
                                  device=device, precision="auto", overwrite=True, axes=("z",)))
    res = {"settings": {"volume": "x".join(map(str, shape)), "backbone": s["seg_backbone"],
                        "weights": "random",
                        "precision": resolve_precision("auto", device), "device": device,
                        "slab_size": slab, "setup_s": time.perf_counter() - t0},
           "runs": []}
    mode = "" if s["seg_processes"] else " (in-process threads)"
    t0 = time.perf_counter()
    with open_cluster(device=device, dashboard_address=":0",
                      processes=s["seg_processes"]) as handle:
        res["settings"]["cluster"] = handle.description + mode
        res["settings"]["cluster_start_s"] = time.perf_counter() - t0
        for b in s["seg_batches"]:
            if not budget.allows():
                res["runs"].append({"batch": b, "workers": 1,
                                    "status": "skipped: time budget spent"})
                continue
            res["runs"].append(seg_run(prep, handle.client, b, 1, s, args))
    # Reads and writes overlap the forward only with more than one worker on the GPU.
    workers, b = s["seg_overlap"]
    if not budget.allows():
        res["runs"].append({"batch": b, "workers": workers,
                            "status": "skipped: time budget spent"})
    else:
        with open_cluster(device=device, dashboard_address=":0", workers=workers,
                          processes=s["seg_processes"]) as handle:
            res["settings"]["overlap_cluster"] = handle.description + mode
            res["runs"].append(seg_run(prep, handle.client, b, workers, s, args))
    return res


# --- report ----------------------------------------------------------------------------------

TARGETS = {  # issue 14's targets, set from arithmetic before any measurement
    "augseg_minutes_1_gpu": 15.0,
    "segment_voxels_per_s": 50e6,
    "segment_ratio": 0.9,
}


def targets(report: dict) -> list[dict]:
    """Each target against the best measured figure (None where its section did not run)."""
    sec = report["sections"]
    minutes = sec.get("augseg", {}).get("projection", {}).get("1_gpu", {}).get("minutes")
    runs = [x for x in sec.get("segment", {}).get("runs", []) if x.get("status") == "done"]
    best = max(runs, key=lambda x: x["voxels_per_s"], default=None)
    rows = [
        ("study AugSeg run projected on 1 GPU, minutes", "<=", TARGETS["augseg_minutes_1_gpu"],
         minutes),
        ("segment-volume voxels/s end to end (best run)", ">=", TARGETS["segment_voxels_per_s"],
         best and best["voxels_per_s"]),
        ("segment-volume / pure forward (that run)", ">=", TARGETS["segment_ratio"],
         best and best["ratio"]),
    ]
    out = []
    for name, op, target, value in rows:
        met = None if value is None else (value <= target if op == "<=" else value >= target)
        out.append({"target": name, "op": op, "value_target": target, "measured": value,
                    "met": met, "factor": None if not value else
                    (value / target if op == "<=" else target / value)})
    return out


def render(report: dict) -> str:
    r = report
    lines = [
        "# GPU check (`benchmarks/gpu_check.py`)", "",
        f"- commit: `{r['commit']}`",
        f"- command: `{r['command']}`",
        "- mode: " + ("smoke (tiny, CPU: code paths only, no meaningful figures)"
                      if r["smoke"] else "full"),
        f"- device: {r['device']}; torch {r['torch']}, Python {r['python']}",
        f"- time budget {r['budget_s']:.0f} s, used {r['elapsed_s']:.0f} s; "
        f"bf16 peak taken as {r['peak_tflops']:g} TFLOP/s", "",
    ]
    for kind in ("augseg", "supervised"):
        sec = r["sections"][kind]
        title = ("AugSeg training step" if kind == "augseg" else "Supervised step")
        lines += [f"## {title}", ""]
        if sec.get("status") != "done":
            lines += [f"{sec.get('status')}", ""]
            continue
        st = sec["settings"]
        lines += [f"{st['backbone']} (deep stem {st['deep_stem']}, OS{st['output_stride']}, "
                  f"decoder {st['decoder_channels']}), "
                  f"crop {st['crop']}, batch {st['batch_per_gpu']}"
                  + (" + " + str(st['batch_per_gpu']) + " unlabelled" if kind == "augseg"
                     else "")
                  + f" per GPU, precision {st.get('precision', 'bf16')}, {st['device']}", "",
                  "images/s: " + ("labelled + unlabelled images per step, as the loop counts "
                                  "them (the student's forward also takes the weak views when "
                                  f"extra_weak: {st['extra_weak']})" if kind == "augseg"
                                  else "labelled images per step") + "; peak GiB: "
                  "torch.cuda.max_memory_allocated, models and optimizer included.", "",
                  "| variant | status | ms/iter (median) | min ms | images/s | peak GiB | "
                  "first call s |", "|---|---|---|---|---|---|---|"]
        for v in sec["variants"]:
            lines.append(f"| {v['variant']} | {v['status']} | {fmt(v.get('ms_per_iter'))} | "
                         f"{fmt(v.get('min_ms'))} | {fmt(v.get('images_per_s'))} | "
                         f"{fmt(v.get('peak_mem_gib'), '.2f')} | "
                         f"{fmt(v.get('first_call_s'), '.1f')} |")
        eager = next((v for v in sec["variants"] if v["variant"] == "eager"
                      and v.get("status") == "done"), None)
        lines.append("")
        if eager:
            lines.append(f"FLOPs (eager, counted): {eager['tflop_per_iter']:.3f} TFLOP per "
                         f"iteration, {100 * eager['share_of_peak']:.1f}% of the bf16 peak.")
        ld = sec["loader"]
        lines.append(f"Loader: {ld['images_per_s']:.1f} images/s "
                     f"({ld['ms_per_step_of_batches']:.0f} ms per step's batches; {ld['note']}).")
        if "fastest" in sec:
            lines.append(f"Fastest variant: {sec['fastest']}.")
        if "projection" in sec:
            p = sec["projection"]
            lines += ["", "| study run (30 epochs, 2298 unlabelled) | iterations | projected "
                      "minutes |", "|---|---|---|"]
            for g in ("1_gpu", "2_gpu"):
                lines.append(f"| {g.replace('_', ' ')} | {p[g]['iterations']} | "
                             f"{p[g]['minutes']:.1f} |")
            lines += ["", sec["projection_note"] + "."]
        lines.append("")
    sec = r["sections"]["sam"]
    lines += ["## SAM", ""]
    if sec.get("status") != "done":
        lines += [f"{sec.get('status')}", ""]
    else:
        st = sec["settings"]
        lines += [f"{st['model']} ({st['weights']}), input {st['input']}, supervised_step, "
                  "precision auto (bf16 on GPUs)", "",
                  "| batch | status | ms/iter (median) | images/s | peak GiB |",
                  "|---|---|---|---|---|"]
        for b in sec["batches"]:
            lines.append(f"| {b['batch']} | {b['status']} | {fmt(b.get('ms_per_iter'))} | "
                         f"{fmt(b.get('images_per_s'))} | {fmt(b.get('peak_mem_gib'), '.2f')} |")
        lines.append("")
    sec = r["sections"]["segment"]
    lines += ["## segment-volume", ""]
    if sec.get("status") != "done":
        lines += [f"{sec.get('status')}", ""]
    else:
        st = sec["settings"]
        lines += [f"{st['volume']} synthetic volume (write_image_store), {st['backbone']} "
                  f"random weights, precision {st.get('precision', 'bf16')}, slab "
                  f"{st['slab_size']}, {st['cluster']}; end to end = segment_volume (zarr read, "
                  "normalise, forward, softmax, argmax, zarr write; workers warmed); forward = "
                  "the model alone over the same slices, already normalised on the device, in "
                  "the same worker process (best of "
                  f"{r['settings']['seg_forward_repeats']}); ratio = voxels/s end to end / "
                  "forward", "",
                  "| batch | workers | status | end-to-end s | voxels/s | forward s | "
                  "forward voxels/s | ratio | worker read / compute / write s | forward TFLOP/s "
                  "| share of peak |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for x in sec["runs"]:
            if x.get("status") != "done":
                lines.append(f"| {x['batch']} | {x['workers']} | {x['status']} |  |  |  |  |  "
                             "|  |  |  |")
                continue
            lines.append(
                f"| {x['batch']} | {x['workers']} | done | {x['end_to_end_s']:.2f} | "
                f"{x['voxels_per_s']:,.0f} | "
                f"{x['forward_s']:.2f} | {x['forward_voxels_per_s']:,.0f} | "
                f"**{x['ratio']:.2f}** | {x['worker_read_s']:.2f} / "
                f"{x['worker_compute_s']:.2f} / {x['worker_write_s']:.2f} | "
                f"{x['forward_tflops']:.2f} | {100 * x['share_of_peak']:.2f}% |")
        lines.append("")
    lines += ["## Targets (issue 14)", "",
              "| target | goal | measured | met | off by (x) |", "|---|---|---|---|---|"]
    for t in r["targets"]:
        v = t["value_target"]
        goal = f"{t['op']} {v:,.0f}" if v >= 1000 else f"{t['op']} {v:g}"
        lines.append(f"| {t['target']} | {goal} | {fmt(t['measured'], ',.6g')} | "
                     f"{'n/a' if t['met'] is None else ('yes' if t['met'] else 'no')} | "
                     f"{fmt(t['factor'], '.2f')} |")
    lines += ["", "Smoke figures come from tiny CPU models and say nothing about the targets."
              if r["smoke"] else "off by: how many times the goal the measurement is away "
              "(above 1: missed by that factor).", ""]
    lines += ["## Notes", ""] + [f"- {n}" for n in r["notes"]] + [""]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true",
                   help="the same code paths tiny on CPU (writes to --out or a temp dir)")
    p.add_argument("--out", default=None,
                   help="folder for gpu.md and gpu.json (default benchmarks/results; with "
                   "--smoke a new temp dir)")
    p.add_argument("--budget-s", type=float, default=480.0,
                   help="hard overall time budget in seconds (default 480: 8 minutes)")
    p.add_argument("--peak-tflops", type=float, default=790.0,
                   help="the GPU's dense bf16 peak in TFLOP/s (default 790: H200)")
    p.add_argument("--sections", default=",".join(SECTIONS),
                   help=f"comma-separated subset of {','.join(SECTIONS)}")
    p.add_argument("--workdir", default=None, help="scratch folder (default: a temp dir)")
    args = p.parse_args(argv)
    s = dict(SMOKE if args.smoke else FULL)
    if not args.smoke and not torch.cuda.is_available():
        p.error("no CUDA GPU visible; run with --smoke for the CPU code-path check")
    if args.out is None:
        out = Path(tempfile.mkdtemp(prefix="gpu_check_smoke_")) if args.smoke else (
            ROOT / "benchmarks" / "results")
    else:
        out = Path(args.out)
    if args.smoke and out.resolve() == (ROOT / "benchmarks" / "results").resolve():
        p.error("--smoke does not overwrite benchmarks/results; give another --out")
    wanted = [x for x in args.sections.split(",") if x]
    if set(wanted) - set(SECTIONS):
        p.error(f"--sections: unknown {sorted(set(wanted) - set(SECTIONS))}")
    for name in ("distributed", "distributed.http.proxy"):
        logging.getLogger(name).setLevel(logging.WARNING)
    os.chdir(ROOT)
    budget = Budget(args.budget_s, s["min_section_s"])
    if s["device"] == "cuda":
        # torch defaults (cudnn.benchmark off), as the project runs; a variant turns it on
        device_name = torch.cuda.get_device_name(0)
    else:
        device_name = f"CPU ({platform.processor() or platform.machine()}, " \
                      f"{len(os.sched_getaffinity(0))} cores visible)"
    notes: list[str] = [
        "CUDA graphs not tried: augseg_step calls .item() and branches on a CPU generator "
        "every step, which graph capture does not allow without restructuring the step.",
    ]
    if args.smoke:
        notes.insert(0, "smoke mode: tiny models on CPU; the figures only show that the code "
                        "paths run, not the GPU's speed.")
    report = {"commit": git_commit(),
              "command": shlex.join([Path(sys.executable).name, *sys.argv]),
              "smoke": args.smoke, "device": device_name, "torch": torch.__version__,
              "python": platform.python_version(), "budget_s": args.budget_s,
              "peak_tflops": args.peak_tflops, "settings": {k: list(v) if isinstance(v, tuple)
                                                            else v for k, v in s.items()},
              "sections": {}, "notes": notes}
    with contextlib.ExitStack() as stack:
        if args.workdir:
            tmp = Path(args.workdir)
            tmp.mkdir(parents=True, exist_ok=True)
        else:
            tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="gpu_check_")))
        for name in SECTIONS:
            if name not in wanted:
                report["sections"][name] = {"status": "skipped: not in --sections"}
                continue
            if not budget.allows():
                report["sections"][name] = {"status": "skipped: time budget spent"}
                continue
            t0 = time.perf_counter()
            try:
                if name in ("augseg", "supervised"):
                    res = section_train(name, s, tmp, budget, args, notes)
                elif name == "sam":
                    res = section_sam(s, budget, args, notes)
                else:
                    res = section_segment(s, tmp, budget, args, notes)
                res["status"] = "done"
            except Exception as e:  # noqa: BLE001 - one failing section must not lose the rest
                traceback.print_exc()
                res = {"status": f"failed: {type(e).__name__}: {str(e).splitlines()[0][:300]}"
                       if str(e) else f"failed: {type(e).__name__}"}
            res["seconds"] = time.perf_counter() - t0
            report["sections"][name] = res
            print(f"{name}: {res['status']} in {res['seconds']:.1f} s", flush=True)
            if s["device"] == "cuda":
                torch.cuda.empty_cache()
    report["elapsed_s"] = time.perf_counter() - budget.t0
    report["targets"] = targets(report)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    (out / "gpu.md").write_text(render(report))
    print(f"wrote {out / 'gpu.md'} and {out / 'gpu.json'} in {report['elapsed_s']:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
