"""What a training measures and writes: validation scores and panels, collapses, weight
digests, metrics.jsonl and curves.png."""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from magseg_hpc.classes import IGNORE_LABEL
from magseg_hpc.config import (
    ExperimentConfig,
)
from magseg_hpc.metrics import confusion_matrix, scores_from_confusion
from magseg_hpc.paths import atomic_write
from magseg_hpc.rundir import (
    CURVES_FILE,
    METRICS_FILE,
)
from magseg_hpc.train import distributed as dist_util
from magseg_hpc.train.board import panel, panel_indices
from magseg_hpc.train.distributed import DistEnv
from magseg_hpc.train.steps import (
    autocast,
)


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
    atomic_write(path, "".join(f"{line}\n" for line in kept))


class Curves:
    """curves.png during a run: redrawn at an evaluation once ``every_s`` seconds have passed
    since the last drawing (the run's end always draws it). It is a picture of metrics.jsonl,
    which holds every number; a drawing takes about a second, many steps of a small model."""

    def __init__(self, output_dir: Path, every_s: float = 30.0) -> None:
        self.output_dir, self.every_s = output_dir, every_s
        self.drawn_at = -math.inf

    def update(self) -> None:
        now = time.monotonic()
        if now - self.drawn_at >= self.every_s:
            plot_curves(self.output_dir)
            self.drawn_at = now


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
    fig.subplots_adjust(left=0.05, right=0.95, bottom=0.14, top=0.9, wspace=0.38)  # no
    # tight_layout: it measured every tick label, a third of the drawing's time
    try:
        atomic_write(output_dir / CURVES_FILE, lambda f: fig.savefig(f, format="png", dpi=80))
    finally:
        plt.close(fig)
