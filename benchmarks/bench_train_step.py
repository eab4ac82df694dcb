"""AugSeg training step throughput against the cost of its parts, measured in the same run.

The step is ``magseg_hpc.train.steps.augseg_step`` past the supervised-only epochs (teacher
forward, confidence, adaptive CutMix, one student forward over labelled + strong views,
both losses, backward, SGD), plus the EMA update the loop does after it. Its parts, measured
alone on the same batches with the same models:

- teacher: forward of the teacher on the weak unlabelled batch under ``no_grad``;
- student: forward of the student on the concatenated labelled + strong batch, cross-entropy,
  backward and the SGD step;
- (reported, not in the sum) EMA: ``ema_update`` of the teacher from the student.

Step, teacher and student are timed round-robin over the same pre-loaded batches (data
loading is not timed) so other people's load on a shared machine hits all of them alike;
medians are reported, and written with the commit, command and raw times to
``benchmarks/results/train_step.md`` (and ``train_step.json``).
ratio = step / (teacher + student): the overhead of AugSeg's own logic (CutMix, confidence,
loss normalisation); close to 1 is good.

    .venv/bin/python benchmarks/bench_train_step.py [--config configs/cpu_tiny.yaml]
        [--repeats 20] [--threads N] [--device cpu] [KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from _results import write_results

from magseg_hpc.classes import IGNORE_LABEL
from magseg_hpc.config import load_config
from magseg_hpc.data.phantom import make_phantom, write_phantom
from magseg_hpc.data.sampling import iters_per_epoch, step_generator
from magseg_hpc.data.slices import LabeledSlices, UnlabeledSlices
from magseg_hpc.train import distributed as dist_util
from magseg_hpc.train.augseg import ema_update
from magseg_hpc.train.setup import (
    StepBatches,
    augment_settings,
    build_models,
    build_optimizer,
    effective_lr,
    fit_data_normalization,
    make_loader,
    model_config,
    open_data,
    resolve_norm,
)
from magseg_hpc.train.steps import augseg_step, with_resolved_precision


def sync(env) -> None:
    if env.device.type == "cuda":
        torch.cuda.synchronize(env.device)


def timed(fn, env) -> float:
    sync(env)
    t0 = time.perf_counter()
    fn()
    sync(env)
    return time.perf_counter() - t0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="configs/cpu_tiny.yaml")
    p.add_argument("--repeats", type=int, default=20, help="timed rounds (default 20)")
    p.add_argument("--warmup", type=int, default=3, help="untimed rounds first (default 3)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: cores)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--shape", default="32,96,96", help="phantom the batches come from")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    args = p.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        vol = Path(tmp) / "phantom.zarr"
        write_phantom(vol, make_phantom(tuple(int(s) for s in args.shape.split(",")), seed=0))
        cfg = load_config(args.config, [f"data.volume={vol}", f"train.device={args.device}",
                                        *args.overrides])
        t = cfg.train
        env = dist_util.init_distributed(t.device)
        data = open_data(cfg, Path(tmp), env)
        norm = fit_data_normalization(cfg, data)
        cfg = resolve_norm(cfg, norm)  # model.norm auto, as training resolves it
        cfg = with_resolved_precision(cfg, env.device)  # train.precision auto, likewise
        aug = augment_settings(cfg)
        labeled = LabeledSlices(data.source, data.splits["labeled"], norm, aug, cfg.seed)
        unlabeled = UnlabeledSlices(data.source, data.splits["unlabeled"], norm, aug, cfg.seed)
        ipe = iters_per_epoch(len(labeled), len(data.splits["unlabeled"]), t.batch_size, 1)
        # batches of the semi-supervised phase: past sup_only_epochs
        start = t.sup_only_epochs * ipe
        n = args.warmup + args.repeats
        plan_kw = {"n_labeled": len(labeled), "n_unlabeled": len(data.splits["unlabeled"]),
                   "batch_size": t.batch_size, "seed": cfg.seed, "rank": 0, "world_size": 1}
        lab = list(make_loader(labeled, StepBatches("labeled", start, start + n, ipe, plan_kw),
                               cfg, env))
        unl = list(make_loader(unlabeled,
                               StepBatches("unlabeled", start, start + n, ipe, plan_kw),
                               cfg, env))
        student, teacher = build_models(cfg, env)
        optimizer = build_optimizer(cfg, student, effective_lr(cfg, 1))
        epoch = t.sup_only_epochs

        def step(i):
            augseg_step(student, teacher, optimizer, lab[i], unl[i], cfg=cfg, env=env,
                        epoch=epoch, generator=step_generator(cfg.seed, 0, start + i))
            ema_update(teacher, student, t.ema_decay)

        def teacher_part(i):
            x_w = unl[i][0].to(env.device)
            with torch.no_grad():
                teacher.eval()
                teacher(x_w).float().softmax(dim=1)

        def student_part(i):
            x_l, y_l = (v.to(env.device) for v in lab[i])
            x_s = unl[i][1].to(env.device)
            logits = student(torch.cat([x_l, x_s])).float()
            # the strong half's targets stand in for pseudo-labels: same cost
            target = torch.cat([y_l, y_l])
            loss = F.cross_entropy(logits, target, ignore_index=IGNORE_LABEL)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

        def ema_part(i):
            ema_update(teacher, student, t.ema_decay)

        times: dict[str, list[float]] = {"step": [], "teacher": [], "student": [], "ema": []}
        parts = (("step", step), ("teacher", teacher_part), ("student", student_part),
                 ("ema", ema_part))
        for i in range(n):
            for name, fn in parts:
                dt = timed(lambda fn=fn, i=i: fn(i), env)
                if i >= args.warmup:
                    times[name].append(dt)

    med = {k: statistics.median(v) for k, v in times.items()}
    images = 2 * t.batch_size  # labelled + unlabelled images per step, as the loop counts
    parts_sum = med["teacher"] + med["student"]
    header = (f"config {args.config}: batch {t.batch_size} labelled + {t.batch_size} "
              f"unlabelled, crop {t.crop_size}, {model_config(cfg).backbone}, device {env.device}, "
              f"{torch.get_num_threads()} threads, {args.warmup} warm-up + {args.repeats} "
              f"timed rounds (median)")
    lines = [header, "", "| part | ms (median) | min ms | images/s |", "|---|---|---|---|"]
    step_ms = 1e3 * (med["step"] - med["ema"])
    rows = [("AugSeg step (augseg_step + EMA)", med["step"]),
            ("augseg_step alone (step - EMA)", med["step"] - med["ema"]),
            ("teacher forward (no_grad, weak batch)", med["teacher"]),
            ("student fwd/bwd/SGD (labelled + strong)", med["student"]),
            ("teacher + student (sum of parts)", parts_sum),
            ("EMA update", med["ema"])]
    mins = {"AugSeg step (augseg_step + EMA)": min(times["step"]),
            "teacher forward (no_grad, weak batch)": min(times["teacher"]),
            "student fwd/bwd/SGD (labelled + strong)": min(times["student"]),
            "EMA update": min(times["ema"])}
    for name, sec in rows:
        mn = mins.get(name)
        lines.append(f"| {name} | {1e3 * sec:.1f} | {'-' if mn is None else f'{1e3 * mn:.1f}'} "
                     f"| {images / sec:.1f} |")
    ratios = {"step_over_parts": med["step"] / parts_sum,
              "step_without_ema_over_parts": step_ms / (1e3 * parts_sum)}
    lines += ["", f"ratio step / (teacher + student) = {ratios['step_over_parts']:.3f} "
              f"(without the EMA update: {ratios['step_without_ema_over_parts']:.3f})"]
    body = "\n".join(lines)
    print(body)
    raw = {"config": args.config, "overrides": args.overrides, "batch_size": t.batch_size,
           "crop_size": t.crop_size, "backbone": model_config(cfg).backbone,
           "device": str(env.device),
           "threads": torch.get_num_threads(), "warmup": args.warmup, "repeats": args.repeats,
           "images_per_step": images, "seconds": times,
           "median_seconds": med, "ratios": ratios}
    print("\nwrote", write_results("train_step", "AugSeg training step vs its parts", body, raw,
                                   note="Parts are timed round-robin with the step, so load "
                                   "from other processes hits all of them alike."))
    return 0


if __name__ == "__main__":
    sys.exit(main())
