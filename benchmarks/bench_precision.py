"""bf16 against fp32 on this CPU: speed as fractions of the machine's matmul limit, and labels.

All in one run, one heavy process at a time, so the ratios compare like with like:

1. Limits: 2048 x 2048 matmul GFLOP/s in fp32 and bf16 (same threads), and the cpu_best
   model's forward (ResNet-18 DeepLabV3+, 5 context slices, decoder 64) on a batch of 600 x
   600 slices (segment-volume's work) in fp32 and bf16 autocast, each with the default and the
   channels_last memory layout; FLOPs counted by ``torch.utils.flop_counter``. Interleaved,
   best of ``--repeats``.
2. One training iteration of cpu_best (``augseg_step`` past the supervised-only epochs + the
   EMA update, batches from the project's loader over a phantom): as before this benchmark
   (fp32, per-tensor AdamW, oneDNN's dilated kernels in layer4 and the ASPP), fp32 with the
   fused AdamW, bf16 autocast with it, and each with the atrous convolutions trained on
   sub-grids (``AtrousConv2d``, what training does now). Interleaved, median of ``--repeats``.
3. Labels: ``magseg-hpc segment-volume`` (a user's command, ``--axes auto``) with
   ``--precision fp32`` and ``bf16``:
   - on held-out phantoms (preset elongated, seeds 1000 and 1001) with a cpu_best model
     trained ``--phantom-iters`` iterations on seed 0: mIoU against the exact truth;
   - on the published sweep (``--sweep-work``: ``bench_real.py``'s folder, its model
     ``run2/best.pt`` unless ``--sweep-model``): mIoU against the clear voxels of the held-out
     slices (``real/paint.py``), the command's wall time, and the workers' compute time as
     a share of it.
   Each: the mIoU of bf16's labels against fp32's (their agreement) and the change in mIoU.

    .venv/bin/python benchmarks/bench_precision.py --work /tmp/precision --sweep-work /tmp/real

Writes ``benchmarks/results/precision.md`` (and ``precision.json``).
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
import time
import types
from pathlib import Path

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _results import write_results  # noqa: E402
from bench_real import labels_of, magseg, scores  # noqa: E402
from paint import clear_labels  # noqa: E402

from magseg_hpc.classes import IGNORE_LABEL  # noqa: E402
from magseg_hpc.config import load_config  # noqa: E402
from magseg_hpc.data.sampling import iters_per_epoch, step_generator  # noqa: E402
from magseg_hpc.data.slices import LabeledSlices, UnlabeledSlices  # noqa: E402
from magseg_hpc.models import build_model, param_groups  # noqa: E402
from magseg_hpc.models.deeplab import AtrousConv2d  # noqa: E402
from magseg_hpc.precision import autocast, cpu_has_bf16  # noqa: E402
from magseg_hpc.train import distributed as dist_util  # noqa: E402
from magseg_hpc.train.augseg import ema_update  # noqa: E402
from magseg_hpc.train.setup import (  # noqa: E402
    StepBatches,
    augment_settings,
    build_models,
    build_optimizer,
    fit_data_normalization,
    make_loader,
    model_config,
    open_data,
    resolve_norm,
)
from magseg_hpc.train.steps import augseg_step  # noqa: E402
from magseg_hpc.volume.io import open_volume  # noqa: E402

CONFIG = "configs/cpu_best.yaml"
TEST_SEEDS = (1000, 1001)


def best_of(fns: dict, repeats: int, pick=min) -> dict[str, float]:
    """Seconds of each callable, interleaved round-robin (one warm-up round first)."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for r in range(repeats + 1):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            if r:
                times[name].append(time.perf_counter() - t0)
    return {k: pick(v) for k, v in times.items()}


def limits(repeats: int) -> dict:
    a32 = torch.randn(2048, 2048)
    a16 = a32.bfloat16()
    # the model cpu_best trains for a masked reconstruction such as the published sweep
    cfg = resolve_norm(load_config(CONFIG), {"support": {"outside": "value", "value": 0.0}})
    torch.manual_seed(0)
    model = build_model(model_config(cfg)).eval()
    x = torch.randn(8, model_config(cfg).context_slices, 600, 600)
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        model(x)
    model_flops = counter.get_total_flops()
    layouts = {"default": (model, x)}
    cl_model = build_model(model_config(cfg)).eval()
    cl_model.load_state_dict(model.state_dict())
    layouts["channels_last"] = (cl_model.to(memory_format=torch.channels_last),
                                x.contiguous(memory_format=torch.channels_last))

    def forward(layout, precision):
        m, xx = layouts[layout]
        with torch.inference_mode(), autocast("cpu", precision):
            m(xx)

    fns = {"matmul fp32": lambda: a32 @ a32, "matmul bf16": lambda: a16 @ a16}
    for layout in layouts:
        for precision in ("fp32", "bf16"):
            fns[f"forward {precision} {layout}"] = (
                lambda la=layout, p=precision: forward(la, p))
    seconds = best_of(fns, repeats)
    flops = {k: (2 * 2048**3 if k.startswith("matmul") else model_flops) for k in fns}
    gflops = {k: flops[k] / seconds[k] / 1e9 for k in fns}
    return {"seconds": seconds, "gflops": gflops, "model_flops_per_batch": model_flops,
            "batch": list(x.shape)}


def dilated_kernels(model: torch.nn.Module) -> None:
    """Train ``model``'s atrous convolutions with oneDNN's dilated kernel, as before
    ``AtrousConv2d`` ran them on sub-grids."""
    for m in model.modules():
        if isinstance(m, AtrousConv2d):
            m.forward = types.MethodType(torch.nn.Conv2d.forward, m)


def train_iteration(work: Path, repeats: int) -> dict:
    """Median seconds of one cpu_best AugSeg iteration per variant (module docstring)."""
    vol = work / "train_step.zarr"
    if not vol.exists():
        magseg("make-phantom", vol, "--preset", "elongated", "--seed", "0")
    cfg = load_config(CONFIG, [f"data.volume={vol}", "train.device=cpu"])
    t = cfg.train
    env = dist_util.init_distributed("cpu")
    (work / "train_step_run").mkdir(exist_ok=True)
    data = open_data(cfg, work / "train_step_run", env)
    norm = fit_data_normalization(cfg, data)
    aug = augment_settings(cfg)
    labeled = LabeledSlices(data.source, data.splits["labeled"], norm, aug, cfg.seed)
    unlabeled = UnlabeledSlices(data.source, data.splits["unlabeled"], norm, aug, cfg.seed)
    ipe = iters_per_epoch(len(labeled), len(data.splits["unlabeled"]), t.batch_size, 1)
    start, n = t.sup_only_epochs * ipe, repeats + 1
    plan_kw = {"n_labeled": len(labeled), "n_unlabeled": len(data.splits["unlabeled"]),
               "batch_size": t.batch_size, "seed": cfg.seed, "rank": 0, "world_size": 1}
    lab = list(make_loader(labeled, StepBatches("labeled", start, start + n, ipe, plan_kw),
                           cfg, env))
    unl = list(make_loader(unlabeled, StepBatches("unlabeled", start, start + n, ipe, plan_kw),
                           cfg, env))
    variants = {}
    for name, precision, fused, atrous in (
            ("fp32, per-tensor AdamW, dilated kernels (before)", "fp32", False, False),
            ("fp32, fused AdamW, dilated kernels", "fp32", True, False),
            ("bf16, fused AdamW, dilated kernels", "bf16", True, False),
            ("fp32, fused AdamW, sub-grid atrous (now)", "fp32", True, True),
            ("bf16, fused AdamW, sub-grid atrous (now)", "bf16", True, True)):
        vcfg = resolve_norm(load_config(CONFIG, [f"data.volume={vol}", "train.device=cpu",
                                                 f"train.precision={precision}"]), norm)
        student, teacher = build_models(vcfg, env)
        if not atrous:
            dilated_kernels(student)
        optimizer = (build_optimizer(vcfg, student, t.lr) if fused else torch.optim.AdamW(
            param_groups(student, t.lr, t.head_lr_mult), lr=t.lr, weight_decay=t.weight_decay))
        variants[name] = (vcfg, student, teacher, optimizer)
    # the step's work: FLOPs of the model as defined (dilated kernels), forward and backward
    vcfg, student, teacher, optimizer = next(iter(variants.values()))
    with FlopCounterMode(display=False) as counter:
        augseg_step(student, teacher, optimizer, lab[0], unl[0], cfg=vcfg, env=env,
                    epoch=t.sup_only_epochs, generator=step_generator(cfg.seed, 0, start))
    times: dict[str, list[float]] = {k: [] for k in variants}
    for i in range(n):
        for name, (vcfg, student, teacher, optimizer) in variants.items():
            t0 = time.perf_counter()
            augseg_step(student, teacher, optimizer, lab[i], unl[i], cfg=vcfg, env=env,
                        epoch=t.sup_only_epochs, generator=step_generator(cfg.seed, 0, start + i))
            ema_update(teacher, student, t.ema_decay)
            if i:
                times[name].append(time.perf_counter() - t0)
    return {"median_seconds": {k: statistics.median(v) for k, v in times.items()},
            "seconds": times, "batch": t.batch_size, "crop": t.crop_size,
            "flops_per_step": counter.get_total_flops()}


def segment_both(volume: Path, model: Path, out: Path) -> dict:
    """segment-volume in fp32 and bf16: wall seconds, workers' compute seconds, labels."""
    res = {}
    for precision in ("fp32", "bf16"):
        log = out.parent / f"{out.name}.{precision}.log"
        wall = magseg("segment-volume", volume, f"{out}.{precision}.zarr", "--model", model,
                      "--precision", precision, "--overwrite", log=log)
        compute = sum(float(c) for c in re.findall(r"compute ([0-9.]+)", log.read_text()))
        res[precision] = {"wall_s": wall, "compute_s": compute,
                          "labels": labels_of(Path(f"{out}.{precision}.zarr"))}
    return res


def compare(both: dict, truth: np.ndarray, rows=slice(None)) -> dict:
    fp32, bf16 = both["fp32"]["labels"][rows], both["bf16"]["labels"][rows]
    s32, s16 = scores(fp32, truth), scores(bf16, truth)
    return {"miou_fp32": s32["miou"], "miou_bf16": s16["miou"],
            "miou_change": s16["miou"] - s32["miou"],
            "agreement_miou": scores(bf16, both["fp32"]["labels"][rows])["miou"],
            "voxels_changed": float((fp32 != bf16).mean()),
            **{f"{p}_{k}": both[p][k] for p in ("fp32", "bf16") for k in ("wall_s", "compute_s")}}


def phantoms(work: Path, iters: int) -> dict:
    train, run = work / "phantom_train.zarr", work / "phantom_run"
    if not (run / "best.pt").exists():
        magseg("make-phantom", train, "--preset", "elongated", "--seed", "0", "--overwrite")
        magseg("train", "--config", CONFIG, "--output-dir", run, f"data.volume={train}",
               f"train.max_iters={iters}", log=work / "phantom_train.log")
    out = {}
    for seed in TEST_SEEDS:
        test = work / f"phantom_test{seed}.zarr"
        magseg("make-phantom", test, "--preset", "elongated", "--seed", seed, "--overwrite")
        both = segment_both(test, run / "best.pt", work / f"phantom_seg{seed}")
        out[f"elongated seed {seed}"] = compare(both, labels_of(test))
    return out


def sweep(work: Path, model: Path) -> dict:
    volume = work / "sweep.zarr"
    image = np.asarray(open_volume(volume))
    painted = set(np.flatnonzero(
        (labels_of(work / "labels.zarr") != IGNORE_LABEL).any(axis=(1, 2))))
    held_out = [z for z in range(image.shape[0]) if z not in painted]
    truth = np.stack([clear_labels(image[z]) for z in held_out])
    both = segment_both(volume, model, work / "precision_seg")
    return {"published sweep": compare(both, truth, held_out)}


def report(lim: dict, step: dict, labels: dict) -> str:
    g, s = lim["gflops"], lim["seconds"]
    lines = [f"CPU bf16 native (AVX512_BF16/AMX): {cpu_has_bf16()}; "
             f"{torch.get_num_threads()} torch threads.", "",
             "| what | seconds | GFLOP/s | / fp32 matmul | / bf16 matmul |",
             "|---|---|---|---|---|"]
    for k in g:
        lines.append(f"| {k} | {s[k]:.3f} | {g[k]:.0f} | {g[k] / g['matmul fp32']:.2f} | "
                     f"{g[k] / g['matmul bf16']:.2f} |")
    b = lim["batch"]
    lines += ["", f"Model forward: cpu_best's model on a batch {b[0]}x{b[1]}x{b[2]}x{b[3]}, "
              f"{lim['model_flops_per_batch'] / 1e9:.0f} GFLOP.", "",
              f"One cpu_best training iteration (batch {step['batch']} labelled + "
              f"{step['batch']} unlabelled, crop {step['crop']}, median; "
              f"{step['flops_per_step'] / 1e9:.1f} GFLOP a step, forward and backward, "
              "counted on the model with dilated kernels):", "",
              "| variant | ms | speed-up over before | GFLOP/s | / fp32 matmul | / bf16 matmul |",
              "|---|---|---|---|---|---|"]
    med = step["median_seconds"]
    base = med[next(iter(med))]  # the first variant: as before
    for k, v in med.items():
        rate = step["flops_per_step"] / v / 1e9
        lines.append(f"| {k} | {1e3 * v:.0f} | {base / v:.2f}x | {rate:.0f} | "
                     f"{rate / g['matmul fp32']:.2f} | {rate / g['matmul bf16']:.2f} |")
    lines += ["", "segment-volume (`--axes auto`), fp32 against bf16:", "",
              "| volume | mIoU fp32 | mIoU bf16 | change | agreement (mIoU bf16 vs fp32) | "
              "voxels changed | wall fp32 s | wall bf16 s | speed-up | compute share bf16 |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for k, r in labels.items():
        lines.append(
            f"| {k} | {r['miou_fp32']:.4f} | {r['miou_bf16']:.4f} | {r['miou_change']:+.4f} | "
            f"{r['agreement_miou']:.4f} | {100 * r['voxels_changed']:.3f} % | "
            f"{r['fp32_wall_s']:.0f} | {r['bf16_wall_s']:.0f} | "
            f"{r['fp32_wall_s'] / r['bf16_wall_s']:.2f}x | "
            f"{r['bf16_compute_s'] / r['bf16_wall_s']:.2f} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", type=Path, required=True, help="scratch folder (created)")
    p.add_argument("--sweep-work", type=Path, default=None,
                   help="bench_real.py's folder (sweep.zarr, labels.zarr); none: phantoms only")
    p.add_argument("--sweep-model", type=Path, default=None,
                   help="model for the sweep (default SWEEP_WORK/run2/best.pt)")
    p.add_argument("--phantom-iters", type=int, default=800)
    p.add_argument("--repeats", type=int, default=10)
    a = p.parse_args()
    work = a.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    lim = limits(a.repeats)
    print(lim["gflops"], flush=True)
    step = train_iteration(work, a.repeats)
    print(step["median_seconds"], flush=True)
    labels = phantoms(work, a.phantom_iters)
    if a.sweep_work:
        labels.update(sweep(a.sweep_work.resolve(),
                            a.sweep_model or a.sweep_work / "run2" / "best.pt"))
    body = report(lim, step, labels)
    print(body)
    raw = {"limits": lim, "train_iteration": step, "labels": labels,
           "cpu_bf16": cpu_has_bf16(), "phantom_iters": a.phantom_iters,
           "sweep_model": str(a.sweep_model or (a.sweep_work and a.sweep_work / "run2/best.pt"))}
    print(write_results("precision", "bf16 against fp32 on this CPU", body, raw))


if __name__ == "__main__":
    main()
