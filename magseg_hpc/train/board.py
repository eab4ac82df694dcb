"""TensorBoard for a training run: ``tensorboard --logdir RUN_DIR``.

Rank 0 writes, into RUN_DIR/tensorboard/, what metrics.jsonl holds (losses, pseudo-label
ratio, per-class thresholds, lr, EMA decay, iteration time; teacher and student validation
mIoU and per-class IoU) plus, at each evaluation, one image panel per shown validation slice:
the image, its labels and the teacher's prediction side by side, each under its caption,
enlarged to at least PANEL_HEIGHT rows, in the display palette (classes.DISPLAY_COLORS:
unlabelled pixels grey) with its legend below. A resumed run purges the events after its
checkpoint, as it truncates metrics.jsonl, so the curves never show a step twice.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch.utils.tensorboard import SummaryWriter

from magseg_hpc.classes import ClassTable, captioned_row
from magseg_hpc.errors import MagsegError
from magseg_hpc.rundir import TENSORBOARD_DIR

STEP_SCALARS = ("loss", "loss_sup", "loss_uns", "pseudo_ratio", "lr", "ema_decay",
                "seconds_per_iter", "images_per_s")
PANEL_SLICES = 3  # validation slices shown at each evaluation
PANEL_HEIGHT = 256  # a panel's pictures are enlarged (whole factor) to at least these rows


class Board:
    """The run's TensorBoard writer; a no-op where ``enabled`` is false (ranks > 0)."""

    def __init__(self, output_dir: Path, iteration: int, classes: ClassTable, enabled: bool):
        self.classes = classes
        self.writer = None
        if enabled:
            logdir = output_dir / TENSORBOARD_DIR
            _check_writable(logdir)
            # a resumed run redoes the steps after its checkpoint: drop those of the killed run
            self.writer = SummaryWriter(str(logdir),
                                        purge_step=iteration + 1 if iteration else None)

    def step(self, record: dict) -> None:
        """A metrics.jsonl step record (averages over the last log window)."""
        if self.writer is None:
            return
        it = record["iteration"]
        for key in STEP_SCALARS:
            if record.get(key) is not None:
                self.writer.add_scalar(f"train/{key}", record[key], it)
        for name, value in (record.get("class_thresholds") or {}).items():
            self.writer.add_scalar(f"pseudo_threshold/{name}", value, it)

    def evaluation(self, record: dict, panels: list[tuple[str, np.ndarray]]) -> None:
        """A metrics.jsonl evaluation record and (name, RGB panel) pairs."""
        if self.writer is None:
            return
        it = record["iteration"]
        for who in ("teacher", "student"):
            self.writer.add_scalar(f"validation/{who}_miou", record[f"{who}_miou"], it)
            for name, value in record[f"{who}_iou"].items():
                self.writer.add_scalar(f"validation_iou/{who}/{name}", value, it)
        for name, panel in panels:
            self.writer.add_image(f"validation_slices/{name}", panel, it, dataformats="HWC")
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _check_writable(logdir: Path) -> None:
    """Refuse a tensorboard/ that cannot take event files in one line, here: the writer's
    thread would print its own traceback beside the error."""
    probe = logdir / ".magseg-probe"
    try:
        logdir.mkdir(exist_ok=True)
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o644)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        what = "is not a folder" if logdir.exists() and not logdir.is_dir() else (
            f"cannot take event files ({e.strerror})")
        raise MagsegError(f"{logdir} {what}; TensorBoard writes there: make it a writable "
                          "folder (or move it away) and rerun") from None


def panel_indices(n: int) -> list[int]:
    """Up to PANEL_SLICES validation slices, spread over the list."""
    return sorted({round(i * (n - 1) / max(1, PANEL_SLICES - 1)) for i in range(PANEL_SLICES)}
                  ) if n else []


def panel(image: torch.Tensor, labels: torch.Tensor, prediction: torch.Tensor,
          classes: ClassTable) -> np.ndarray:
    """(H, W, 3) uint8 (classes.captioned_row): "image", the middle context slice in grey
    (1-99 % window), "labels" and "prediction" in the display palette, with its legend."""
    grey = image[image.shape[0] // 2].float().cpu().numpy()
    low, high = np.percentile(grey, [1, 99])
    grey = np.clip((grey - low) / max(float(high - low), 1e-12), 0, 1)
    grey = np.repeat((grey * 255).astype(np.uint8)[..., None], 3, axis=2)
    return captioned_row([("image", grey), ("labels", classes.rgb(labels.cpu().numpy())),
                          ("prediction", classes.rgb(prediction.cpu().numpy(), None))],
                         classes, min_height=PANEL_HEIGHT)
