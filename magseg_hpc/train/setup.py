"""What a training is built from: splits and data, loaders, models, optimizer and schedule, RNG
state. ``loop.py`` composes them."""

from __future__ import annotations

import copy
import dataclasses
import logging
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from magseg_hpc.config import (
    ExperimentConfig,
)
from magseg_hpc.data.augment import resolve_strong_pool
from magseg_hpc.data.normalize import fit_normalization
from magseg_hpc.data.sampling import epoch_plan
from magseg_hpc.data.slices import AugmentSettings, FolderSlices, MultiAxisSlices, VolumeSlices
from magseg_hpc.data.splits import (
    check_split_indices,
    make_splits,
    other_axis_keys,
    read_split,
    sparse_label_slices,
    write_split,
)
from magseg_hpc.errors import MagsegError
from magseg_hpc.models import ModelConfig, build_model, param_groups
from magseg_hpc.rundir import (
    SPLITS_DIR,
)
from magseg_hpc.train import distributed as dist_util
from magseg_hpc.train.augseg import (
    poly_lr,
)
from magseg_hpc.train.distributed import DistEnv
from magseg_hpc.volume.support import describe as describe_support
from magseg_hpc.volume.support import is_masked, resolve_support, support_of

log = logging.getLogger(__name__)

SPLIT_NAMES = ("labeled", "unlabeled", "val")  # splits/NAME.txt


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
    (``splits.other_axis_keys``)."""
    d = cfg.data
    split_dir = output_dir / SPLITS_DIR
    paths = {name: split_dir / f"{name}.txt" for name in SPLIT_NAMES}
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
            if not d.folder:  # a volume's split files list slice indices
                check_split_indices(splits, given, n_slices, n_val_slices, d.axis)
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


def labelled_share(cfg: ExperimentConfig, splits: dict[str, list[str]]) -> float:
    """Labelled slices / all slices along data.axis (other-axis keys hold ":"): also the share
    of each y or x slice's rows that carry labels in a data.axes run (segment-volume's
    ``--axes auto`` falls back on it for checkpoints without a fusion check)."""
    names = ("labeled", "unlabeled") if cfg.data.val_volume else ("labeled", "unlabeled", "val")
    primary = {name: [k for k in splits[name] if ":" not in str(k)] for name in names}
    total = sum(len(keys) for keys in primary.values())
    return len(primary["labeled"]) / total if total else 0.0


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
        volume = data.source.image_volume()
        support = resolve_support(volume, cfg.data.outside)  # the whole volume's decision
        norm = fit_normalization(volume.isel({axis: idx}), support=support)
    else:
        sample = data.source.normalization_sample(train_keys)
        norm = fit_normalization(sample, support=resolve_support(sample, cfg.data.outside))
    log.info("training volume: %s", describe_support(norm["support"]))
    return {**norm, "mark_outside": cfg.data.mark_outside}


def check_experiment(cfg: ExperimentConfig) -> ExperimentConfig:
    """What the config layer leaves to the layers above it: the model section checked by
    the model layer's schema, and the strong-augmentation pool's names. Returns ``cfg`` with
    the model section complete (every key, as configured), as config.yaml records it."""
    model = model_config(cfg)
    resolve_strong_pool(cfg.train.strong_ops)
    return dataclasses.replace(cfg, model=model.section())


def model_config(cfg: ExperimentConfig) -> ModelConfig:
    """The experiment's model config (num_classes from its class table)."""
    return ModelConfig.from_dict(cfg.model_dict())


def resolve_norm(cfg: ExperimentConfig, normalization: dict) -> ExperimentConfig:
    """``model.norm: auto`` decided for this training volume (``ModelConfig.resolved``):
    GroupNorm on a masked one, BatchNorm otherwise. On a masked volume the crops mix
    all-outside crops (one constant value) with crops of the sample, and BatchNorm's running
    statistics follow the mix of the last batches, so the same weights predict differently
    from one evaluation to the next (the published sweep's unstable validation;
    tests/test_stability.py); on unmasked volumes BatchNorm trained better (`tomo`: GroupNorm
    -0.02 to -0.05 mIoU). ImageNet weights (``model.pretrained``) were trained with BatchNorm
    and keep it. The returned config (checkpoints, the model) holds the decision."""
    model = model_config(cfg)
    if model.norm != "auto":
        return cfg
    masked = is_masked(support_of(normalization))
    norm = model.resolved(masked=masked).norm
    why = ("ImageNet weights" if model.pretrained else
           "a masked volume" if masked else "no masked background")
    log.info("model.norm auto: %s (%s)", norm, why)
    return dataclasses.replace(cfg, model={**cfg.model, "norm": norm})


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


def augment_settings(cfg: ExperimentConfig) -> AugmentSettings:
    """The crops and augmentations of the training datasets, from the config."""
    t = cfg.train
    return AugmentSettings(
        crop_size=t.crop_size, scale_range=tuple(t.scale_range), vflip=t.vflip, rot90=t.rot90,
        num_strong_augs=t.num_strong_augs, random_num_augs=t.random_num_augs,
        strong_ops=tuple(resolve_strong_pool(t.strong_ops)),
        context=model_config(cfg).context_slices, foreground=t.foreground_crop,
    )


def build_models(cfg: ExperimentConfig, env: DistEnv) -> tuple[nn.Module, nn.Module]:
    """(student, teacher): the same initial weights on every rank (seeded), teacher frozen."""
    torch.manual_seed(cfg.seed)
    student = build_model(model_config(cfg))
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
