"""AugSeg semi-supervised training and the supervised baseline, read top to bottom.

Order: output dir and splits -> data -> models and optimizer -> resume -> one AugSeg (or
supervised) step -> evaluation -> checkpointing and metrics -> the loop (``run_training``).
The step follows shared/reference/augseg.md section 3; its formulas live in
``magseg_hpc.train.augseg``.

Determinism: the model is initialised from ``seed`` (identical on every rank); every sample's
augmentation and every step's CutMix draws come from generators derived from (seed, epoch,
position) and (seed, rank, iteration) (see ``magseg_hpc.data.slices``). The training state is
therefore the weights, optimizer state and iteration alone, and a run stopped after a
checkpoint and resumed ends bit-identical on CPU to an uninterrupted one. The global RNG
states are saved and restored as well, for any code that uses them.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import math
import os
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from magseg_hpc.classes import IGNORE_LABEL
from magseg_hpc.config import (
    ExperimentConfig,
    config_to_dict,
    save_config,
)
from magseg_hpc.cpus import process_cpus
from magseg_hpc.data.augment import resolve_strong_pool
from magseg_hpc.data.normalize import fit_normalization
from magseg_hpc.data.slices import (
    AugmentSettings,
    FolderSlices,
    LabeledSlices,
    MultiAxisSlices,
    UnlabeledSlices,
    ValSlices,
    VolumeSlices,
    epoch_plan,
    iters_per_epoch,
    make_splits,
    other_axis_keys,
    read_split,
    sparse_label_slices,
    step_generator,
    write_split,
)
from magseg_hpc.errors import MagsegError
from magseg_hpc.logfile import AppendFileHandler
from magseg_hpc.metrics import confusion_matrix, scores_from_confusion
from magseg_hpc.models import build_model, param_groups
from magseg_hpc.models.checkpoint import load_checkpoint, nonfinite_tensors, save_checkpoint
from magseg_hpc.precision import autocast as precision_autocast
from magseg_hpc.precision import describe as describe_precision
from magseg_hpc.precision import resolve_precision
from magseg_hpc.rundir import (
    BEST_FILE,
    CHECKPOINT_FILE,
    CONFIG_FILE,
    CURVES_FILE,
    LOGS_DIR,
    METRICS_FILE,
    SPLITS_DIR,
    SUMMARY_FILE,
    check_run_folder,
    claim,
    has_checkpoint,
)
from magseg_hpc.train import distributed as dist_util
from magseg_hpc.train.augseg import (
    adaptive_mix,
    class_thresholds,
    ema_decay,
    ema_update,
    image_confidence,
    poly_lr,
    pseudo_label_ratio,
    uns_ramp,
    unsupervised_loss,
)
from magseg_hpc.train.board import Board, panel, panel_indices
from magseg_hpc.train.distributed import DistEnv
from magseg_hpc.train.fusion_check import record_fusion_check
from magseg_hpc.train.losses import supervised_loss

log = logging.getLogger(__name__)



# --- output dir ------------------------------------------------------------------------------


def check_output_dir(cfg: ExperimentConfig, output_dir: Path) -> None:
    """rundir.check_run_folder (rank 0 checks the claim; the others start once it has
    claimed the folder); then rank 0 clears what a run that failed before its first
    checkpoint left: its config, splits and metrics do not bind the next try."""
    main_rank = os.environ.get("RANK", "0") == "0"
    check_run_folder(output_dir, config_to_dict(cfg), check_claim=main_rank)
    if main_rank and output_dir.is_dir() and not has_checkpoint(output_dir) and (
            output_dir / CONFIG_FILE).is_file():
        for stale in [output_dir / METRICS_FILE, *(output_dir / SPLITS_DIR).glob("*.txt")]:
            stale.unlink(missing_ok=True)


@contextlib.contextmanager
def rank_log(output_dir: Path, rank: int):
    """Send this package's log records to output_dir/logs/rank{N}.log while training."""
    path = output_dir / LOGS_DIR / f"rank{rank}.log"
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = AppendFileHandler(path)
    handler.setLevel(logging.INFO)
    handler.setFormatter(logging.Formatter(
        f"%(asctime)s rank{rank} %(levelname)s %(name)s: %(message)s"))
    pkg = logging.getLogger("magseg_hpc")
    old_level = pkg.level
    if pkg.getEffectiveLevel() > logging.INFO:
        pkg.setLevel(logging.INFO)
    pkg.addHandler(handler)
    try:
        yield path
    finally:
        pkg.removeHandler(handler)
        pkg.setLevel(old_level)
        handler.close()


# --- data ------------------------------------------------------------------------------------


def _split_header(cfg: ExperimentConfig, name: str) -> str:
    d = cfg.data
    if d.folder:
        return f"{name} images of {d.folder}"
    source = d.val_volume if (name == "val" and d.val_volume) else d.volume
    return f"{name} slice indices along {d.axis} of {source}"


def resolve_splits(cfg: ExperimentConfig, output_dir: Path, env: DistEnv,
                   n_slices: int | None, n_val_slices: int | None,
                   multi_axis: VolumeSlices | None = None) -> dict[str, list[str]]:
    """The run's splits: reused from output_dir/splits when present (resume), otherwise made
    (or copied from the given split files) and written there by rank 0. With ``multi_axis``
    (the primary-axis source of a data.axes run) the slices along the other axes are added
    (``slices.other_axis_keys``)."""
    d = cfg.data
    split_dir = output_dir / SPLITS_DIR
    paths = {name: split_dir / f"{name}.txt" for name in ("labeled", "unlabeled", "val")}
    if env.is_main and not all(p.is_file() for p in paths.values()):
        given = {"labeled": d.labeled_split, "unlabeled": d.unlabeled_split, "val": d.val_split}
        if d.folder:
            for name in given:
                default = Path(d.folder) / f"{name}.txt"
                if given[name] is None and default.is_file():
                    given[name] = str(default)
        splits: dict[str, list] = {}
        if given["labeled"]:
            splits = {name: read_split(p) if p else [] for name, p in given.items()}
        elif d.folder:
            raise MagsegError(f"{d.folder}: no labeled.txt; give data.labeled_split")
        else:
            splits = make_splits(
                n_slices, n_labeled=d.n_labeled, n_val=d.n_val,
                labeled_selection=d.labeled_selection, val_selection=d.val_selection,
                seed=cfg.seed, n_val_slices=n_val_slices, **sparse_label_slices(d),
            )
        if multi_axis is not None:
            labeled, unlabeled = other_axis_keys(multi_axis, train_axes(cfg),
                                                 len(splits["labeled"]))
            splits["labeled"] = [*map(str, splits["labeled"]), *labeled]
            splits["unlabeled"] = [*map(str, splits["unlabeled"]), *unlabeled]
        for name, path in paths.items():
            write_split(path, splits[name], _split_header(cfg, name))
        log.info("splits written to %s: %d labelled, %d unlabelled, %d validation", split_dir,
                 len(splits["labeled"]), len(splits["unlabeled"]), len(splits["val"]))
    dist_util.barrier(env)
    splits = {name: read_split(path) for name, path in paths.items()}
    if not splits["labeled"]:
        raise MagsegError(f"{paths['labeled']} lists no labelled slices; training needs some")
    if cfg.train.method == "augseg" and not splits["unlabeled"]:
        raise MagsegError(
            f"{paths['unlabeled']} lists no unlabelled slices; AugSeg needs them "
            "(or use train.method=supervised)"
        )
    return splits


@dataclass
class TrainData:
    splits: dict[str, list[str]]
    source: object  # VolumeSlices or FolderSlices
    val_source: object
    normalization: dict | None = None


def open_data(cfg: ExperimentConfig, output_dir: Path, env: DistEnv) -> TrainData:
    d = cfg.data
    if bool(d.volume) == bool(d.folder):
        raise MagsegError(
            "give exactly one of data.volume (an image + labels zarr store) or data.folder "
            "(images/, masks/, labeled.txt ...)"
        )
    if d.folder:
        source = FolderSlices(d.folder, cfg.class_table, image_dir=d.image_dir,
                              mask_dir=d.mask_dir)
        splits = resolve_splits(cfg, output_dir, env, None, None)
        return TrainData(splits, source, source)
    kw = {"image_var": d.image_var, "label_var": d.label_var, "cache_mb": d.cache_mb}
    source = VolumeSlices(d.volume, d.axis, label_path=d.label_volume, **kw)
    val_source = (VolumeSlices(d.val_volume, d.axis, label_path=d.val_label_volume, **kw)
                  if d.val_volume else source)
    axes = train_axes(cfg)
    multi = len(axes) > 1
    splits = resolve_splits(cfg, output_dir, env, len(source),
                            len(val_source) if d.val_volume else None,
                            multi_axis=source if multi else None)
    if multi:
        primary = [k for k in splits["labeled"] if ":" not in k]
        source = MultiAxisSlices(source, axes, primary)
        if not d.val_volume:
            val_source = source
    return TrainData(splits, source, val_source)


def per_plane(keys: list[str], primary: str) -> str:
    """' (6 z + 6 y + 6 x slices)' for split keys of several planes ('12' along the primary
    axis, 'y:12' along another), else ''."""
    planes: dict[str, int] = {}
    for key in keys:
        plane = key.split(":", 1)[0] if ":" in key else primary
        planes[plane] = planes.get(plane, 0) + 1
    if len(planes) < 2:
        return ""
    return " (" + " + ".join(f"{n} {p}" for p, n in planes.items()) + " slices)"


def labelled_share(cfg: ExperimentConfig, splits: dict[str, list[str]]) -> float:
    """Labelled slices / all slices along data.axis (other-axis keys hold ":"): also the share
    of each y or x slice's rows that carry labels in a data.axes run (segment-volume's
    ``--axes auto`` falls back on it for checkpoints without a fusion check)."""
    names = ("labeled", "unlabeled") if cfg.data.val_volume else ("labeled", "unlabeled", "val")
    primary = {name: [k for k in splits[name] if ":" not in str(k)] for name in names}
    total = sum(len(keys) for keys in primary.values())
    return len(primary["labeled"]) / total if total else 0.0


def train_axes(cfg: ExperimentConfig) -> list[str]:
    """data.axes (checked with the config), or the one data.axis; data.axis first."""
    axes = list(cfg.data.axes or [cfg.data.axis])
    return [cfg.data.axis] + [a for a in axes if a != cfg.data.axis]


def fit_data_normalization(cfg: ExperimentConfig, data: TrainData) -> dict:
    """Fitted once, on the training images (labelled + unlabelled, never validation), with
    the model's input encoding (data.mark_outside)."""
    train_keys = data.splits["labeled"] + data.splits["unlabeled"]
    if isinstance(data.source, VolumeSlices | MultiAxisSlices):
        axis = data.source.axis
        idx = sorted({int(k) for k in train_keys if ":" not in k})
        norm = fit_normalization(data.source.image_volume().isel({axis: idx}))
    else:
        norm = fit_normalization(data.source.normalization_sample(train_keys))
    return {**norm, "mark_outside": cfg.data.mark_outside}


class StepBatches:
    """This rank's ``which`` batches for iterations [start, stop), epoch after epoch.

    The DataLoader batch sampler of a whole run: the role of DistributedSampler plus
    ``set_epoch``, with the orders a function of (seed, epoch) only, so a resumed run starts
    at any iteration without replaying the ones before.
    """

    def __init__(self, which: str, start: int, stop: int, iters_per_epoch: int, plan_kw: dict):
        self.which, self.start, self.stop = which, start, stop
        self.ipe, self.plan_kw = iters_per_epoch, plan_kw

    def __len__(self) -> int:
        return max(0, self.stop - self.start)

    def __iter__(self):
        plan = None
        for it in range(self.start, self.stop):
            epoch, step = divmod(it, self.ipe)
            if plan is None or plan.epoch != epoch:
                plan = epoch_plan(epoch, **self.plan_kw)
            yield getattr(plan, self.which)[step]


def make_loader(dataset, batches: StepBatches, cfg: ExperimentConfig,
                env: DistEnv) -> DataLoader:
    workers = cfg.data.num_workers
    # Spawned, not forked: zarr 3 runs its I/O on an event-loop thread, and a forked child
    # inherits the loop without the thread and hangs on its first read.
    return DataLoader(dataset, batch_sampler=batches, num_workers=workers,
                      pin_memory=env.device.type == "cuda",
                      multiprocessing_context="spawn" if workers else None,
                      prefetch_factor=2 if workers else None)


# --- models and optimizer --------------------------------------------------------------------


def augment_settings(cfg: ExperimentConfig) -> AugmentSettings:
    """The crops and augmentations of the training datasets, from the config."""
    t = cfg.train
    return AugmentSettings(
        crop_size=t.crop_size, scale_range=tuple(t.scale_range), vflip=t.vflip, rot90=t.rot90,
        num_strong_augs=t.num_strong_augs, random_num_augs=t.random_num_augs,
        strong_ops=tuple(resolve_strong_pool(t.strong_ops)),
        context=cfg.model.context_slices, foreground=t.foreground_crop,
    )


def build_models(cfg: ExperimentConfig, env: DistEnv) -> tuple[nn.Module, nn.Module]:
    """(student, teacher): the same initial weights on every rank (seeded), teacher frozen."""
    torch.manual_seed(cfg.seed)
    student = build_model(cfg.model_dict())
    if env.distributed and env.device.type == "cuda":
        student = nn.SyncBatchNorm.convert_sync_batchnorm(student)
    student.to(env.device).train()
    teacher = copy.deepcopy(student)
    for p in teacher.parameters():
        p.requires_grad_(False)
    teacher.eval()
    return student, teacher


def effective_lr(cfg: ExperimentConfig, world_size: int) -> float:
    """train.lr, scaled linearly by the total labelled batch when lr_reference_batch is set."""
    t = cfg.train
    if t.lr_reference_batch is None:
        return t.lr
    return t.lr * t.batch_size * world_size / t.lr_reference_batch


def build_optimizer(cfg: ExperimentConfig, student: nn.Module, lr: float):
    t = cfg.train
    groups = param_groups(student, lr, t.head_lr_mult)
    # fused: one kernel over all parameters instead of ~10 per tensor (AdamW's step was a
    # fifth of a CPU training step); same state dict, so checkpoints load either way
    if cfg.optimizer_name() == "adamw":
        return torch.optim.AdamW(groups, lr=lr, weight_decay=t.weight_decay, fused=True)
    return torch.optim.SGD(groups, lr=lr, momentum=t.momentum, weight_decay=t.weight_decay,
                           fused=True)


def set_lr(optimizer, iteration: int, total_iters: int, power: float) -> float:
    """Poly schedule on the optimizer that steps (not a copy of its groups)."""
    for group in optimizer.param_groups:
        group["lr"] = poly_lr(group["base_lr"], iteration, total_iters, power)
    return optimizer.param_groups[0]["lr"]


# --- RNG state (saved for resume as tensors and plain values: weights_only loads it) --------


def rng_state() -> dict:
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": list(random.getstate()[1]),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"],
                         n["has_gauss"], n["cached_gaussian"]))
    random.setstate((3, tuple(state["python"]), None))
    if "cuda" in state and torch.cuda.is_available():
        try:
            torch.cuda.set_rng_state_all(state["cuda"])
        except (RuntimeError, IndexError, ValueError) as e:
            # e.g. resumed on fewer GPUs than saved: GPU random draws differ from here on
            log.warning("CUDA RNG state of %d GPUs not restored (%s): GPU randomness after "
                        "this resume differs from an uninterrupted run", len(state["cuda"]), e)


# --- one training step -----------------------------------------------------------------------


def autocast(env: DistEnv, cfg: ExperimentConfig):
    """The forwards' precision: train.precision on this rank's device (losses stay fp32)."""
    return precision_autocast(env.device, resolve_precision(cfg.train.precision, env.device))


def augseg_step(student, teacher, optimizer, batch_l, batch_u, *, cfg: ExperimentConfig,
                env: DistEnv, epoch: int, generator: torch.Generator,
                uns_factor: float = 1.0) -> dict:
    """One AugSeg step (spec section 3); returns the loss terms and the pseudo-label ratio."""
    t = cfg.train
    dev = env.device
    x_l, y_l = (v.to(dev, non_blocking=True) for v in batch_l)
    x_w, x_s, valid = (v.to(dev, non_blocking=True) for v in batch_u)
    b = x_l.shape[0]

    with torch.no_grad(), autocast(env, cfg):
        teacher.eval()
        probs = teacher(x_w).float().softmax(dim=1)
    conf, pseudo = probs.max(dim=1)
    pseudo[~valid] = IGNORE_LABEL  # crop padding never enters L_uns
    img_conf = image_confidence(probs)

    if epoch < t.sup_only_epochs:
        with autocast(env, cfg):
            logits_l = student(x_l).float()
        loss_sup = supervised_loss(logits_l, y_l, cfg.dice_weight())
        loss_uns = torch.zeros((), device=dev)
        ratio = 0.0
    else:
        # from the teacher's own predictions, before CutMix pastes labelled boxes (conf 1)
        threshold = (class_thresholds(conf, pseudo, t.threshold, probs.shape[1])
                     if t.class_thresholds else t.threshold)
        # the CPU generator decides the gate and the mixing: the same draws on any device
        if float(torch.rand((), generator=generator)) < t.cutmix_prob:
            x_s, pseudo, conf = adaptive_mix(
                x_s, pseudo, conf, x_l, y_l, img_conf.cpu(), generator,
                uniform_centre=t.uniform_cutmix_centre,
            )
        # one forward over labelled + strong, so BN sees both (as the study); with
        # extra_weak the weak views join too and only move the BN statistics
        views = [x_l, x_w, x_s] if t.extra_weak else [x_l, x_s]
        with autocast(env, cfg):
            logits = student(torch.cat(views)).float()
        logits_l, logits_s = logits[:b], logits[-b:]
        loss_sup = supervised_loss(logits_l, y_l, cfg.dice_weight())
        loss_uns = unsupervised_loss(logits_s, pseudo, conf, threshold)
        ratio = pseudo_label_ratio(conf, threshold, pseudo)
    loss = loss_sup + t.uns_weight * uns_factor * loss_uns
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    stats = {"loss": loss.item(), "loss_sup": loss_sup.item(), "loss_uns": loss_uns.item(),
             "pseudo_ratio": ratio}
    if epoch >= t.sup_only_epochs:
        stats["thresholds"] = (threshold.tolist() if isinstance(threshold, torch.Tensor)
                               else [float(threshold)] * probs.shape[1])
    return stats


def supervised_step(student, optimizer, batch_l, *, cfg: ExperimentConfig, env: DistEnv) -> dict:
    """The baseline: cross-entropy on the labelled batch only, same model and schedule."""
    x_l, y_l = (v.to(env.device, non_blocking=True) for v in batch_l)
    with autocast(env, cfg):
        logits = student(x_l).float()
    loss = supervised_loss(logits, y_l, cfg.dice_weight())
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return {"loss": loss.item(), "loss_sup": loss.item(), "loss_uns": 0.0, "pseudo_ratio": 0.0}


def check_finite_step(env: DistEnv, stats: dict, iteration: int) -> None:
    """Stop a diverged run (on every rank at once) before it saves or evaluates anything."""
    finite = all(math.isfinite(stats[k]) for k in ("loss", "loss_sup", "loss_uns"))
    flag = dist_util.all_reduce_sum(
        env, torch.tensor([0.0 if finite else 1.0], device=env.device))
    if float(flag[0]) > 0:
        raise MagsegError(
            f"training diverged at iteration {iteration + 1}: loss {stats['loss']:.4g} "
            f"(sup {stats['loss_sup']:.4g}, uns {stats['loss_uns']:.4g}) on rank {env.rank} "
            "or another; nothing from this step was saved; lower "
            "train.lr (and check the data for NaN) and start a new --output-dir"
        )


def check_finite_weights(student: nn.Module, teacher: nn.Module, iteration: int) -> None:
    for who, model in (("student", student), ("teacher", teacher)):
        bad = nonfinite_tensors(model.state_dict())
        if bad:
            raise MagsegError(
                f"training diverged by iteration {iteration}: {who} weights hold NaN/inf "
                f"({len(bad)} tensors, e.g. {bad[0]}); no checkpoint was written for it; "
                "lower train.lr and start a new --output-dir"
            )


# --- evaluation ------------------------------------------------------------------------------


@torch.no_grad()
def evaluate(model: nn.Module, dataset, cfg: ExperimentConfig, env: DistEnv) -> dict:
    """Dataset-level scores on whole validation slices, confusion matrix summed over ranks.

    Each rank takes every world_size-th slice (no padding, so no slice counts twice).
    """
    num_classes = cfg.class_table.num_classes
    was_training = model.training
    model.eval()
    cm = torch.zeros((num_classes, num_classes), dtype=torch.int64, device=env.device)
    for i in range(env.rank, len(dataset), env.world_size):
        image, labels = dataset[i]
        with autocast(env, cfg):
            logits = model(image[None].to(env.device))
        pred = logits.argmax(dim=1)[0]
        cm += confusion_matrix(pred, labels.to(env.device), num_classes, ignore=IGNORE_LABEL)
    dist_util.all_reduce_sum(env, cm)
    model.train(was_training)
    scores = scores_from_confusion(cm)
    scores["confusion"] = cm.cpu().tolist()
    return scores


@torch.no_grad()
def validation_panels(model: nn.Module, dataset, cfg: ExperimentConfig,
                      env: DistEnv) -> list[tuple[str, np.ndarray]]:
    """TensorBoard panels (image, labels, prediction) of a few validation slices."""
    was_training = model.training
    model.eval()
    panels = []
    for i in panel_indices(len(dataset)):
        image, labels = dataset[i]
        with autocast(env, cfg):
            pred = model(image[None].to(env.device)).argmax(dim=1)[0]
        panels.append((dataset.keys[i].replace(":", "_"),
                       panel(image, labels, pred, cfg.class_table)))
    model.train(was_training)
    return panels


# Validation this far below its running best, once pseudo-labels are in use, is a collapse.
COLLAPSE_DROP = 0.05


def collapse_drop(miou: float, best: dict, epoch: int, sup_only_epochs: int) -> float | None:
    """How far ``miou`` fell below the running best, when that is a collapse, else None."""
    if epoch < sup_only_epochs or best["teacher_miou"] is None:
        return None
    drop = best["teacher_miou"] - miou if math.isfinite(miou) else math.inf
    return drop if drop > COLLAPSE_DROP else None


# --- checkpoints and metrics -----------------------------------------------------------------


def state_digest(module: nn.Module) -> str:
    """SHA-256 over the state dict (names and bytes): equal digests mean equal weights."""
    h = hashlib.sha256()
    for name, value in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(value.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()
                 if value.dim() else value.detach().cpu().reshape(1).view(torch.uint8)
                 .numpy().tobytes())
    return h.hexdigest()


def _cpu_state(module: nn.Module) -> dict:
    return {k: v.detach().cpu() for k, v in module.state_dict().items()}


def _finite(value):
    """NaN (an absent class) as null, so metrics.jsonl stays strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, list):
        return [_finite(v) for v in value]
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    return value


def append_metrics(output_dir: Path, record: dict) -> None:
    with open(output_dir / METRICS_FILE, "a") as f:
        f.write(json.dumps(_finite(record)) + "\n")


def truncate_metrics(output_dir: Path, iteration: int) -> None:
    """Drop records logged after the checkpoint we resume from (they will be redone)."""
    path = output_dir / METRICS_FILE
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            if json.loads(line).get("iteration", 0) <= iteration:
                kept.append(line)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(f"{line}\n" for line in kept))
    tmp.replace(path)


def plot_curves(output_dir: Path) -> None:
    """curves.png: losses, lr and pseudo-label ratio, and teacher/student mIoU per iteration."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps, evals = [], []
    path = output_dir / METRICS_FILE
    if not path.is_file():
        return
    for line in path.read_text().splitlines():
        rec = json.loads(line)
        (evals if "teacher_miou" in rec else steps).append(rec)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    if steps:
        it = [r["iteration"] for r in steps]
        for key in ("loss", "loss_sup", "loss_uns"):
            axes[0].plot(it, [r[key] for r in steps], label=key)
        axes[1].plot(it, [r["pseudo_ratio"] for r in steps], label="pseudo-label ratio")
        ax_lr = axes[1].twinx()
        ax_lr.plot(it, [r["lr"] for r in steps], color="grey", linestyle="--", label="lr")
        ax_lr.set_ylabel("lr")
    if evals:
        it = [r["iteration"] for r in evals]
        for who in ("teacher", "student"):
            values = [r[f"{who}_miou"] for r in evals]
            axes[2].plot(it, [np.nan if v is None else v for v in values], marker="o", label=who)
    titles = ("loss", "pseudo-label ratio (lr dashed)", "validation mIoU")
    for ax, title in zip(axes, titles, strict=True):
        ax.set_title(title)
        ax.set_xlabel("iteration")
        ax.legend(loc="best")
    fig.tight_layout()
    tmp = output_dir / f".{CURVES_FILE}.tmp.png"
    fig.savefig(tmp, dpi=80)
    plt.close(fig)
    tmp.replace(output_dir / CURVES_FILE)


# --- the loop --------------------------------------------------------------------------------


def run_training(cfg: ExperimentConfig, output_dir: str | Path) -> dict:
    """Train (or resume) the experiment ``cfg`` in ``output_dir``; returns a summary dict.

    Runs as one process, under torchrun or as a submitit task: the world comes from the
    environment (``magseg_hpc.train.distributed``). Resumes from output_dir/checkpoint.pt
    whenever it exists, so calling it again after preemption continues the run. Only rank 0
    writes config, splits, checkpoints and metrics; every rank logs to logs/rank{N}.log.
    """
    output_dir = Path(output_dir).absolute()
    check_output_dir(cfg, output_dir)
    created = not output_dir.exists()
    if os.environ.get("RANK", "0") == "0":
        claim(output_dir)
    env = dist_util.init_distributed(cfg.train.device)
    try:
        with rank_log(output_dir, env.rank):
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
        plot_curves(run.output_dir)


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


def _train(cfg: ExperimentConfig, output_dir: Path, env: DistEnv) -> dict:
    t = cfg.train
    started = time.perf_counter()
    if env.device.type == "cpu":
        # several processes on one CPU node share its allocated cores, not the node's
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", env.world_size))
        torch.set_num_threads(t.threads or process_cpus(local_world))
    if env.is_main:
        save_config(cfg, output_dir / CONFIG_FILE)
    # data (a refusal here is the command's one line: nothing is logged before it)
    data = open_data(cfg, output_dir, env)
    log.info("experiment %s: method %s, rank %d of %d on %s (%s), output %s", cfg.name,
             t.method, env.rank, env.world_size, env.device,
             describe_precision(resolve_precision(t.precision, env.device), env.device),
             output_dir)
    checkpoint_path = output_dir / CHECKPOINT_FILE
    ckpt = None
    if checkpoint_path.is_file():
        ckpt = load_checkpoint(checkpoint_path, expect_class_table=cfg.class_table,
                               expect_model=cfg.model_dict())
        data.normalization = dict(ckpt["normalization"])
    else:
        data.normalization = dist_util.broadcast_object(
            env, fit_data_normalization(cfg, data) if env.is_main else None)
    norm = data.normalization
    aug = augment_settings(cfg)
    labeled = LabeledSlices(data.source, data.splits["labeled"], norm, aug, cfg.seed)
    semi = t.method == "augseg"
    unlabeled = (UnlabeledSlices(data.source, data.splits["unlabeled"], norm, aug, cfg.seed)
                 if semi else None)
    n_unlabeled = len(data.splits["unlabeled"])  # sets the epoch length for both methods
    ipe = t.iters_per_epoch or iters_per_epoch(len(labeled), n_unlabeled, t.batch_size,
                                               env.world_size)
    run = Run(cfg, env, output_dir, norm, labelled_share(cfg, data.splits), ipe,
              t.epochs * ipe,
              ValSlices(data.val_source, data.splits["val"], norm, cfg.model.context_slices)
              if data.splits["val"] else None)
    stop = min(run.total_iters, t.max_iters) if t.max_iters else run.total_iters

    # models, optimizer and where the run stands
    student, teacher = build_models(cfg, env)
    lr = effective_lr(cfg, env.world_size)
    state = TrainState(student, teacher, build_optimizer(cfg, student, lr))
    if ckpt is not None:
        state.restore(ckpt, env.world_size)
        if env.is_main:
            truncate_metrics(output_dir, state.iteration)
        log.info("resumed from %s at iteration %d of %d", checkpoint_path, state.iteration,
                 stop)
    ddp_student = student
    if env.distributed:
        ddp_student = nn.parallel.DistributedDataParallel(
            student, device_ids=[env.device.index] if env.device.type == "cuda" else None,
            broadcast_buffers=False,  # buffers are synced after each step instead
        )
    sync_buffers = env.distributed and env.device.type != "cuda"  # no SyncBN on CPU
    log.info("%d labelled%s, %d unlabelled, %d validation slices; %d iterations/epoch, "
             "%d in total, this run stops at %d; lr %.3g (head x%g), batch %d x %d processes",
             len(labeled), per_plane(data.splits["labeled"], cfg.data.axis), n_unlabeled,
             len(run.val) if run.val else 0, ipe, run.total_iters, stop, lr, t.head_lr_mult,
             t.batch_size, env.world_size)
    if semi and t.epochs <= t.sup_only_epochs:
        log.warning("train.epochs %d <= train.sup_only_epochs %d: no pseudo-labels are ever "
                    "used, this AugSeg run trains supervised only; raise train.epochs",
                    t.epochs, t.sup_only_epochs)

    run.board = Board(output_dir, state.iteration, cfg.class_table, env.is_main)
    window = LogWindow()
    start_iteration = state.iteration
    plan_kw = {"n_labeled": len(labeled), "n_unlabeled": n_unlabeled,
               "batch_size": t.batch_size, "seed": cfg.seed, "rank": env.rank,
               "world_size": env.world_size, "iters": t.iters_per_epoch}
    lab_loader = make_loader(
        labeled, StepBatches("labeled", state.iteration, stop, ipe, plan_kw), cfg, env)
    unl_loader = (make_loader(unlabeled, StepBatches("unlabeled", state.iteration, stop, ipe,
                                                     plan_kw), cfg, env)
                  if semi else [None] * (stop - state.iteration))
    for batch_l, batch_u in zip(lab_loader, unl_loader, strict=True):
        it, epoch = state.iteration, state.iteration // ipe
        lr_now = set_lr(state.optimizer, it, run.total_iters, t.poly_power)
        if semi:
            stats = augseg_step(
                ddp_student, teacher, state.optimizer, batch_l, batch_u, cfg=cfg, env=env,
                epoch=epoch, generator=step_generator(cfg.seed, env.rank, it),
                uns_factor=uns_ramp(it, ipe, t.sup_only_epochs, t.uns_rampup_epochs))
        else:
            stats = supervised_step(ddp_student, state.optimizer, batch_l, cfg=cfg, env=env)
        check_finite_step(env, stats, it)
        if sync_buffers:
            dist_util.broadcast_buffers(env, student)
        decay = ema_decay(it, ipe, t.sup_only_epochs, t.ema_decay, t.ema_schedule)
        ema_update(teacher, student, decay)
        state.iteration = it = it + 1
        window.add({**stats, "lr": lr_now, "ema_decay": decay})

        if it % t.log_every == 0 or it == stop:
            record = window.record(run, it, epoch, t.batch_size * (2 if semi else 1))
            log.info("it %d/%d ep %d loss %.4f (sup %.4f uns %.4f) pseudo %.3f lr %.3g "
                     "%.2f s/it", it, stop, epoch, record["loss"], record["loss_sup"],
                     record["loss_uns"], record["pseudo_ratio"], lr_now,
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
    fusion = None
    if state.iteration == stop and len(train_axes(cfg)) > 1 and data.splits["val"]:
        # --axes auto's evidence: fused vs the labelled axis alone, on validation (fusion_check)
        if env.is_main:
            log.info("orthoplane fusion check: segmenting the validation volume along %s and "
                     "scoring %d validation slices (minutes on a CPU for a real-size volume)",
                     ",".join(train_axes(cfg)), len(data.splits["val"]))
            fusion = record_fusion_check(
                output_dir / BEST_FILE, data.val_source, data.splits["val"], train_axes(cfg),
                cfg.class_table.num_classes, env.device, resolve_precision(t.precision, env.device))
        dist_util.barrier(env)
    return finish(run, state, start_iteration, fusion, time.perf_counter() - started)


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
        tmp = output_dir / f".{SUMMARY_FILE}.tmp"
        tmp.write_text(json.dumps(_finite(summary), indent=2) + "\n")
        tmp.replace(output_dir / SUMMARY_FILE)
    return summary
