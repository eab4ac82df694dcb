"""AugSeg semi-supervised training and the supervised baseline: the run and its loop.

``run_training`` claims the run folder (``rundir.claim``), opens the rank's log and runs
``_train``: open the data and the models
(``setup.py``), resume a ``TrainState`` from checkpoint.pt, then a flat loop of steps
(``steps.py``; the method's formulas in ``augseg.py``), log windows, validations and
checkpoints (``records.py``), and at the end the fusion check and the run's summary.

Determinism: the model is initialised from ``seed`` (identical on every rank); every sample's
augmentation and every step's CutMix draws come from generators derived from (seed, epoch,
position) and (seed, rank, iteration) (see ``magseg_hpc.data.sampling``). The training state is
therefore the weights, optimizer state and iteration alone, and a run stopped after a
checkpoint and resumed ends bit-identical on CPU to an uninterrupted one. The global RNG
states are saved and restored as well, for any code that uses them.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from magseg_hpc.config import (
    ExperimentConfig,
    config_to_dict,
    save_config,
)
from magseg_hpc.cpus import process_cpus
from magseg_hpc.data.sampling import iters_per_epoch, step_generator
from magseg_hpc.data.slices import LabeledSlices, UnlabeledSlices, ValSlices
from magseg_hpc.data.splits import check_label_values
from magseg_hpc.errors import MagsegError
from magseg_hpc.logfile import rank_log
from magseg_hpc.models.checkpoint import check_architecture, load_checkpoint, save_checkpoint
from magseg_hpc.paths import atomic_write, remove_temp_files
from magseg_hpc.precision import describe as describe_precision
from magseg_hpc.rundir import (
    BEST_FILE,
    CHECKPOINT_FILE,
    CONFIG_FILE,
    CURVES_FILE,
    LOGS_DIR,
    METRICS_FILE,
    RUN_MARKER,
    SPLITS_DIR,
    SUBMISSION_FILE,
    SUMMARY_FILE,
    SubmissionRecord,
    claim,
    has_checkpoint,
)
from magseg_hpc.staging import writer_lock
from magseg_hpc.train import distributed as dist_util
from magseg_hpc.train.augseg import (
    ema_decay,
    ema_update,
    uns_ramp,
)
from magseg_hpc.train.board import Board
from magseg_hpc.train.distributed import DistEnv
from magseg_hpc.train.fusion_check import record_fusion_check
from magseg_hpc.train.records import (
    Curves,
    _cpu_state,
    _finite,
    append_metrics,
    collapse_drop,
    evaluate,
    plot_curves,
    state_digest,
    truncate_metrics,
    validation_panels,
)
from magseg_hpc.train.setup import (
    SPLIT_NAMES,
    StepBatches,
    TrainData,
    augment_settings,
    build_models,
    build_optimizer,
    check_experiment,
    effective_lr,
    fit_data_normalization,
    labelled_share,
    make_loader,
    open_data,
    per_plane,
    resolve_norm,
    rng_state,
    set_lr,
    set_rng_state,
    train_axes,
)
from magseg_hpc.train.steps import (
    augseg_step,
    check_finite_step,
    check_finite_weights,
    supervised_step,
    with_resolved_precision,
)

log = logging.getLogger(__name__)


# --- output dir ------------------------------------------------------------------------------


# the run folder's files: atomic_write names its temp files after them
RUN_FILES = (CONFIG_FILE, CHECKPOINT_FILE, BEST_FILE, METRICS_FILE, SUMMARY_FILE, CURVES_FILE,
             RUN_MARKER, SUBMISSION_FILE)


def clear_failed_start(output_dir: Path) -> None:
    """What a run that failed before its first checkpoint left (its config, splits and
    metrics do not bind the next try), and the temp files of a killed run's atomic writes (a
    checkpoint's: its size). Rank 0, once it has claimed the folder."""
    if not has_checkpoint(output_dir) and (output_dir / CONFIG_FILE).is_file():
        for stale in [output_dir / METRICS_FILE, *(output_dir / SPLITS_DIR).glob("*.txt")]:
            stale.unlink(missing_ok=True)
    remove_temp_files(output_dir, RUN_FILES)
    remove_temp_files(output_dir / SPLITS_DIR, [f"{n}.txt" for n in SPLIT_NAMES])


# --- the loop --------------------------------------------------------------------------------


def run_training(cfg: ExperimentConfig, output_dir: str | Path, *,
                 submission: SubmissionRecord | None = None) -> dict:
    """Train (or resume) the experiment ``cfg`` in ``output_dir``; returns a summary dict.

    Runs as one process, under torchrun or as a submitit task (``submission``: the job's,
    whose folder it is): the world comes from the environment (``distributed.read_world``).
    Resumes from output_dir/checkpoint.pt whenever it exists, so calling it again after
    preemption continues the run. Only rank 0 writes config, splits, checkpoints and
    metrics; every rank logs to logs/rank{N}.log.
    """
    output_dir = Path(output_dir).absolute()
    cfg = check_experiment(cfg)
    rank = dist_util.read_world()[0]
    # Rank 0 is the run folder's one writer, as every output has one (staging.writer_lock):
    # a second training of it is refused in one line naming the holder. The other ranks of
    # the same run write only their own logs, and take no lock.
    with writer_lock(output_dir) if rank == 0 else contextlib.nullcontext():
        return _run_claimed(cfg, output_dir, rank, submission)


def _run_claimed(cfg: ExperimentConfig, output_dir: Path, rank: int,
                 submission: SubmissionRecord | None) -> dict:
    """run_training once rank 0 holds the lock: check, claim, train."""
    if rank == 0:  # bad labels are refused before the run folder is made
        check_label_values(cfg)
    created = not output_dir.exists()
    claim(output_dir, config_to_dict(cfg), rank=rank, submission=submission)
    if rank == 0:
        clear_failed_start(output_dir)
    env = dist_util.init_distributed(cfg.train.device)
    try:
        with rank_log(output_dir / LOGS_DIR, env.rank):
            return _train(cfg, output_dir, env)
    except MagsegError:
        # a refusal (bad data, a diverged first epoch) leaves no half-made run folder behind
        if created and env.is_main and not has_checkpoint(output_dir):
            shutil.rmtree(output_dir, ignore_errors=True)
        raise
    finally:
        dist_util.shutdown(env)


@dataclass
class TrainState:
    """What a checkpoint restores: the models and optimizer, where the run is, its best
    validation so far, its last evaluation and the collapses seen."""

    student: nn.Module
    teacher: nn.Module
    optimizer: torch.optim.Optimizer
    iteration: int = 0
    best: dict = field(default_factory=lambda: {"teacher_miou": None, "iteration": None})
    last_eval: dict = field(default_factory=dict)
    collapses: list = field(default_factory=list)

    def restore(self, ckpt: dict, world_size: int) -> None:
        """Continue from ``ckpt`` (checkpoint.pt): weights, optimizer, RNGs, metrics."""
        self.student.load_state_dict(ckpt["student"])
        self.teacher.load_state_dict(ckpt["teacher"])
        ts = ckpt["train_state"]
        self.optimizer.load_state_dict(ts["optimizer"])
        self.iteration = int(ts["iteration"])
        metrics = ckpt["metrics"]
        self.best = dict(metrics.get("best", self.best))
        self.last_eval = dict(metrics.get("last_eval", {}))
        self.collapses = list(metrics.get("collapses", []))
        if ts.get("world_size", world_size) != world_size:
            log.warning("resuming a run of %d processes with %d: the epoch length and the "
                        "data order change from here on", ts["world_size"], world_size)
        set_rng_state(ts["rng"])


@dataclass
class Run:
    """A training's fixed context: config, world, run folder, schedule, validation data."""

    cfg: ExperimentConfig
    env: DistEnv
    output_dir: Path
    normalization: dict
    labelled_share: float
    iters_per_epoch: int
    total_iters: int
    val: ValSlices | None
    board: Board | None = None
    curves: Curves | None = None

    def checkpoint(self, state: TrainState, with_train_state: bool) -> dict:
        """checkpoint.pt (with the training state) or best.pt (without) as a dict."""
        student = state.student
        return {
            "model": student.config if hasattr(student, "config") else self.cfg.model_dict(),
            "class_table": self.cfg.class_table.to_dict(),
            "normalization": dict(self.normalization),
            "student": _cpu_state(student),
            "teacher": _cpu_state(state.teacher),
            "train_state": {
                "iteration": state.iteration, "epoch": state.iteration // self.iters_per_epoch,
                "iters_per_epoch": self.iters_per_epoch, "total_iters": self.total_iters,
                "world_size": self.env.world_size,
                "optimizer": state.optimizer.state_dict(), "rng": rng_state(),
            } if with_train_state else {},
            "config": config_to_dict(self.cfg),
            "labelled_share": self.labelled_share,
            "metrics": {"best": dict(state.best), "last_eval": dict(state.last_eval),
                        "collapses": list(state.collapses)},
        }


def validate(run: Run, state: TrainState) -> None:
    """Score teacher and student on the validation slices; keep the best teacher in best.pt;
    say so in one log line when validation collapses (COLLAPSE_DROP below its best)."""
    cfg, env, it = run.cfg, run.env, state.iteration
    check_finite_weights(state.student, state.teacher, it)
    if run.val is None:
        return
    scores = {who: evaluate(m, run.val, cfg, env)
              for who, m in (("teacher", state.teacher), ("student", state.student))}
    record = {"iteration": it, "epoch": it // run.iters_per_epoch}
    for who, s in scores.items():
        record[f"{who}_miou"] = s["miou"]
        record[f"{who}_iou"] = dict(zip(cfg.class_table.names, s["iou"], strict=True))
    record["teacher_confusion"] = scores["teacher"]["confusion"]
    miou = scores["teacher"]["miou"]
    state.last_eval = {"iteration": it, "teacher_miou": miou,
                       "student_miou": scores["student"]["miou"]}
    log.info("iteration %d: mIoU teacher %.4f, student %.4f", it, miou,
             scores["student"]["miou"])
    improved = math.isfinite(miou) and (state.best["teacher_miou"] is None
                                        or miou > state.best["teacher_miou"])
    if improved:
        state.best = {"teacher_miou": miou, "iteration": it}
    drop = collapse_drop(miou, state.best, it // run.iters_per_epoch, cfg.train.sup_only_epochs)
    if drop is not None:
        best = state.best
        state.collapses.append({"iteration": it, "teacher_miou": miou, "drop": drop,
                                "best_iteration": best["iteration"]})
        log.warning("validation collapsed at iteration %d: teacher mIoU %.4f is %.3f below "
                    "its best %.4f (iteration %d); best.pt keeps iteration %d", it, miou, drop,
                    best["teacher_miou"], best["iteration"], best["iteration"])
    if env.is_main:
        append_metrics(run.output_dir, record)
        run.board.evaluation(record, validation_panels(state.teacher, run.val, cfg, env))
        if improved:
            save_checkpoint(run.output_dir / BEST_FILE, run.checkpoint(state, False))
        run.curves.update()


def save(run: Run, state: TrainState) -> None:
    """checkpoint.pt (rank 0), then every rank waits for it."""
    check_finite_weights(state.student, state.teacher, state.iteration)
    if run.env.is_main:
        path = run.output_dir / CHECKPOINT_FILE
        save_checkpoint(path, run.checkpoint(state, True))
        log.info("checkpoint at iteration %d written to %s", state.iteration, path)
    dist_util.barrier(run.env)


class LogWindow:
    """The steps since the last log line, averaged over all ranks into one metrics record."""

    KEYS = ("loss", "loss_sup", "loss_uns", "pseudo_ratio")

    def __init__(self) -> None:
        self.steps: list[dict] = []
        self.started = time.perf_counter()

    def add(self, stats: dict) -> None:
        self.steps.append(stats)

    def record(self, run: Run, iteration: int, epoch: int, images_per_step: int) -> dict:
        env, steps = run.env, self.steps
        sums = torch.tensor([[sum(w[k] for w in steps) for k in self.KEYS]],
                            dtype=torch.float64, device=env.device)
        dist_util.all_reduce_sum(env, sums)
        n = len(steps) * env.world_size
        seconds = time.perf_counter() - self.started
        last = steps[-1]
        record = {"iteration": iteration, "epoch": epoch,
                  **{k: float(v) / n for k, v in zip(self.KEYS, sums[0].tolist(), strict=True)},
                  "lr": last["lr"], "ema_decay": last["ema_decay"],
                  "seconds_per_iter": seconds / len(steps),
                  "images_per_s": len(steps) * images_per_step * env.world_size / seconds}
        thresholds = [w["thresholds"] for w in steps if "thresholds" in w]
        if thresholds:  # this rank's mean over the window: what the pseudo-labels met
            record["class_thresholds"] = dict(zip(run.cfg.class_table.names,
                                                  np.mean(thresholds, axis=0).tolist()))
        self.steps, self.started = [], time.perf_counter()
        return record


def open_run(cfg: ExperimentConfig, output_dir: Path, env: DistEnv):
    """The data, the run's context and the checkpoint to resume (None for a new run):
    (run, data, labelled dataset, unlabelled dataset or None, checkpoint)."""
    t = cfg.train
    if env.device.type == "cpu":
        # several processes on one CPU node share its allocated cores, not the node's
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", env.world_size))
        torch.set_num_threads(t.threads or process_cpus(local_world))
    if env.is_main:
        save_config(cfg, output_dir / CONFIG_FILE)
    # data (a refusal here is the command's one line: nothing is logged before it)
    data = open_data(cfg, output_dir, env)
    # decided once, on this rank's device; config.yaml keeps the choice (a resumed run may
    # land on other hardware)
    cfg = with_resolved_precision(cfg, env.device)
    log.info("experiment %s: method %s, rank %d of %d on %s (%s), output %s", cfg.name,
             t.method, env.rank, env.world_size, env.device,
             describe_precision(cfg.train.precision, env.device), output_dir)
    ckpt = None
    if (output_dir / CHECKPOINT_FILE).is_file():
        ckpt = load_checkpoint(output_dir / CHECKPOINT_FILE, expect_class_table=cfg.class_table)
        norm = dict(ckpt["normalization"])
    else:
        norm = dist_util.broadcast_object(
            env, fit_data_normalization(cfg, data) if env.is_main else None)
    cfg = resolve_norm(cfg, norm)  # model.norm auto: from the volume, as the model's input
    if ckpt is not None:
        check_architecture(output_dir / CHECKPOINT_FILE, ckpt, cfg.model_dict())
    data.normalization = norm
    aug = augment_settings(cfg)
    labeled = LabeledSlices(data.source, data.splits["labeled"], norm, aug, cfg.seed)
    unlabeled = (UnlabeledSlices(data.source, data.splits["unlabeled"], norm, aug, cfg.seed)
                 if t.method == "augseg" else None)
    # the unlabelled slices set the epoch length for both methods
    ipe = t.iters_per_epoch or iters_per_epoch(len(labeled), len(data.splits["unlabeled"]),
                                               t.batch_size, env.world_size)
    run = Run(cfg, env, output_dir, norm, labelled_share(cfg, data.splits), ipe,
              t.epochs * ipe,
              ValSlices(data.val_source, data.splits["val"], norm, aug.context)
              if data.splits["val"] else None)
    return run, data, labeled, unlabeled, ckpt


def train_step(run: Run, state: TrainState, model: nn.Module, batch_l, batch_u) -> dict:
    """One step of the method (``model``: the student, DDP-wrapped when distributed), the
    teacher's EMA update and the iteration count; the step's numbers for the log."""
    cfg, env, t, it = run.cfg, run.env, run.cfg.train, state.iteration
    ipe = run.iters_per_epoch
    lr = set_lr(state.optimizer, it, run.total_iters, t.poly_power)
    if batch_u is not None:
        stats = augseg_step(
            model, state.teacher, state.optimizer, batch_l, batch_u, cfg=cfg, env=env,
            epoch=it // ipe, generator=step_generator(cfg.seed, env.rank, it),
            uns_factor=uns_ramp(it, ipe, t.sup_only_epochs, t.uns_rampup_epochs))
    else:
        stats = supervised_step(model, state.optimizer, batch_l, cfg=cfg, env=env)
    check_finite_step(env, stats, it)
    if env.distributed and env.device.type != "cuda":  # no SyncBN on CPU: rank 0's buffers
        dist_util.broadcast_buffers(env, state.student)
    decay = ema_decay(it, ipe, t.sup_only_epochs, t.ema_decay, t.ema_schedule)
    ema_update(state.teacher, state.student, decay)
    state.iteration += 1
    return {**stats, "lr": lr, "ema_decay": decay}


def _train(cfg: ExperimentConfig, output_dir: Path, env: DistEnv) -> dict:
    t, started = cfg.train, time.perf_counter()
    run, data, labeled, unlabeled, ckpt = open_run(cfg, output_dir, env)
    cfg = run.cfg  # model.norm auto resolved for the volume
    ipe, stop = run.iters_per_epoch, min(run.total_iters, t.max_iters or run.total_iters)
    student, teacher = build_models(cfg, env)
    lr = effective_lr(cfg, env.world_size)
    state = TrainState(student, teacher, build_optimizer(cfg, student, lr))
    if ckpt is not None:
        state.restore(ckpt, env.world_size)
        if env.is_main:
            truncate_metrics(output_dir, state.iteration)
        log.info("resumed from %s at iteration %d of %d", output_dir / CHECKPOINT_FILE,
                 state.iteration, stop)
    model = student if not env.distributed else nn.parallel.DistributedDataParallel(
        student, device_ids=[env.device.index] if env.device.type == "cuda" else None,
        broadcast_buffers=False)  # buffers are synced after each step instead
    log.info("%d labelled%s, %d unlabelled, %d validation slices; %d iterations/epoch, "
             "%d in total, this run stops at %d; lr %.3g (head x%g), batch %d x %d processes",
             len(labeled), per_plane(data.splits["labeled"], cfg.data.axis),
             len(data.splits["unlabeled"]), len(run.val) if run.val else 0, ipe,
             run.total_iters, stop, lr, t.head_lr_mult, t.batch_size, env.world_size)
    if unlabeled is not None and t.epochs <= t.sup_only_epochs:
        log.warning("train.epochs %d <= train.sup_only_epochs %d: no pseudo-labels are ever "
                    "used, this AugSeg run trains supervised only; raise train.epochs",
                    t.epochs, t.sup_only_epochs)

    run.board = Board(output_dir, state.iteration, cfg.class_table, env.is_main)
    run.curves = Curves(output_dir)
    window, start_iteration = LogWindow(), state.iteration
    plan = {"n_labeled": len(labeled), "n_unlabeled": len(data.splits["unlabeled"]),
            "batch_size": t.batch_size, "seed": cfg.seed, "rank": env.rank,
            "world_size": env.world_size, "iters": t.iters_per_epoch}
    batches = [make_loader(dataset, StepBatches(name, state.iteration, stop, ipe, plan), cfg,
                           env) if dataset is not None else [None] * (stop - state.iteration)
               for name, dataset in (("labeled", labeled), ("unlabeled", unlabeled))]
    # a bar with the ETA on rank 0 in a terminal (log lines printed above it); in a log
    # file (SLURM) the log lines are the progress
    with logging_redirect_tqdm(), tqdm(
            total=stop, initial=state.iteration, unit="it", desc="train",
            dynamic_ncols=True, disable=not (env.is_main and sys.stderr.isatty())) as bar:
        for batch_l, batch_u in zip(*batches, strict=True):
            epoch = state.iteration // ipe
            window.add(train_step(run, state, model, batch_l, batch_u))
            it = state.iteration
            bar.update(1)
            if it % t.log_every == 0 or it == stop:
                record = window.record(run, it, epoch, t.batch_size * (1 if batch_u is None else 2))
                log.info("it %d/%d ep %d loss %.4f (sup %.4f uns %.4f) pseudo %.3f lr %.3g "
                         "%.2f s/it", it, stop, epoch, record["loss"], record["loss_sup"],
                         record["loss_uns"], record["pseudo_ratio"], record["lr"],
                         record["seconds_per_iter"])
                if env.is_main:
                    append_metrics(output_dir, record)
                    run.board.step(record)
            if (it % t.eval_every == 0 if t.eval_every else it % ipe == 0) or it == stop:
                validate(run, state)
            if it % t.checkpoint_every == 0 or it == stop:
                save(run, state)
    run.board.close()
    if state.iteration == start_iteration:
        log.info("nothing to do: %s is already at iteration %d of %d", output_dir,
                 state.iteration, stop)
    fusion = fusion_at_end(run, data) if state.iteration == stop else None
    return finish(run, state, start_iteration, fusion, time.perf_counter() - started)


def fusion_at_end(run: Run, data: TrainData) -> dict | None:
    """--axes auto's evidence for a multi-axis training: fused vs the labelled axis alone, on
    the validation slices (fusion_check.py), stored in best.pt by rank 0."""
    cfg, env = run.cfg, run.env
    if len(train_axes(cfg)) < 2 or not data.splits["val"]:
        return None
    fusion = None
    if env.is_main:
        log.info("orthoplane fusion check: segmenting the validation volume along %s and "
                 "scoring %d validation slices (minutes on a CPU for a real-size volume)",
                 ",".join(train_axes(cfg)), len(data.splits["val"]))
        fusion = record_fusion_check(
            run.output_dir / BEST_FILE, data.val_source, data.splits["val"], train_axes(cfg),
            cfg.class_table.num_classes, env.device, cfg.train.precision)
    dist_util.barrier(env)
    return fusion


def finish(run: Run, state: TrainState, start_iteration: int, fusion: dict | None,
           seconds: float) -> dict:
    """The summary of the run (summary.json on rank 0), the collapses in one warning."""
    output_dir, env, best = run.output_dir, run.env, state.best
    if state.collapses:
        worst = max(state.collapses, key=lambda c: c["drop"])
        log.warning("validation collapsed %d time(s) in this training (worst: teacher mIoU %.4f at "
                    "iteration %d, %.3f below the best); best.pt is iteration %s",
                    len(state.collapses), worst["teacher_miou"], worst["iteration"],
                    worst["drop"], best["iteration"])
    summary = {
        "output_dir": str(output_dir),
        "rank": env.rank,
        "world_size": env.world_size,
        "iterations": state.iteration,
        "total_iterations": run.total_iters,
        "iterations_per_epoch": run.iters_per_epoch,
        "iterations_this_run": state.iteration - start_iteration,
        "seconds": seconds,
        "best_teacher_miou": best["teacher_miou"],
        "best_iteration": best["iteration"],
        "last_eval": state.last_eval,
        "collapses": state.collapses,
        "checkpoint": str(output_dir / CHECKPOINT_FILE),
        "best": str(output_dir / BEST_FILE) if (output_dir / BEST_FILE).is_file() else None,
        "config": str(output_dir / CONFIG_FILE),
        "metrics": str(output_dir / METRICS_FILE),
        "fusion_check": ({k: fusion[k] for k in ("axis", "axis_miou", "axes", "fused_miou")}
                         if fusion else None),
        "student_digest": state_digest(state.student),
        "teacher_digest": state_digest(state.teacher),
    }
    if env.is_main:
        if (output_dir / METRICS_FILE).is_file():
            plot_curves(output_dir)
        atomic_write(output_dir / SUMMARY_FILE, json.dumps(_finite(summary), indent=2) + "\n")
    return summary
