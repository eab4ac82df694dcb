"""The pure pieces of an AugSeg training step (Zhao et al., CVPR 2023, "Augmentation Matters",
section 3; where we depart from the study's code: docs/commands.md, Training).

Each function is one formula of the method and is tested against it in
tests/test_augseg_parts.py; the training loop composes them. Randomness comes only from the
generator passed in (torch or numpy, see ``magseg_hpc.data.rng``).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from magseg_hpc.classes import IGNORE_LABEL
from magseg_hpc.data.rng import Rng

Generator = torch.Generator | np.random.Generator


def ema_decay(
    iteration: int, iters_per_epoch: int, sup_only_epochs: int, max_decay: float,
    schedule: str = "study",
) -> float:
    """Teacher EMA decay at global iteration ``iteration`` (0-based); N iters_per_epoch, e0
    sup_only_epochs.

    ``study`` (AugSeg): 0 while epoch = iteration // N <= e0, so the teacher is an exact copy
    of the student through epoch 0 (with e0 = 0), and through the first epoch that uses
    pseudo-labels in general; afterwards min(1 - 1 / (t - N * e0 + 1), max_decay).
    ``mean_teacher``: 0 while epoch < e0 (supervised only), then min(1 - 1 / (t + 1),
    max_decay): the teacher averages from the first pseudo-labelled step on.
    ``average``: min(1 - 1 / (t + 1), max_decay) from the first step (Tarvainen & Valpola's
    mean teacher, supervised epochs included): the teacher smooths the student's swings
    before it makes its first pseudo-label too.
    """
    epoch = iteration // iters_per_epoch
    if schedule == "average":
        return min(1.0 - 1.0 / (iteration + 1), max_decay)
    if schedule == "mean_teacher":
        return 0.0 if epoch < sup_only_epochs else min(1.0 - 1.0 / (iteration + 1), max_decay)
    if epoch <= sup_only_epochs:
        return 0.0
    return min(1.0 - 1.0 / (iteration - iters_per_epoch * sup_only_epochs + 1), max_decay)


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, decay: float) -> None:
    """teacher <- decay * teacher + (1 - decay) * student over all parameters AND floating
    buffers (BN running statistics); integer buffers (num_batches_tracked) are copied.
    decay = 0 copies exactly. Pass the unwrapped student (``ddp.module``)."""
    student = getattr(student, "module", student)
    t_tensors = dict(teacher.named_parameters()) | dict(teacher.named_buffers())
    s_tensors = dict(student.named_parameters()) | dict(student.named_buffers())
    if t_tensors.keys() != s_tensors.keys():
        diff = sorted(t_tensors.keys() ^ s_tensors.keys())[:5]
        raise ValueError(f"teacher and student differ in tensors, e.g. {diff}")
    blend_t, blend_s = [], []
    for name, t in t_tensors.items():
        s = s_tensors[name]
        if decay == 0.0 or not t.is_floating_point():
            t.copy_(s)
        else:
            blend_t.append(t)
            blend_s.append(s.detach())
    if blend_t:
        torch._foreach_mul_(blend_t, decay)
        torch._foreach_add_(blend_t, blend_s, alpha=1.0 - decay)


def image_confidence(probs: torch.Tensor) -> torch.Tensor:
    """Per-image confidence mean_hw[(1 - H(P) / log C) * max_c P], shape (B,).

    probs: (B, C, H, W) softmax probabilities. Uniform predictions give 0, one-hot give 1.
    """
    num_classes = probs.shape[1]
    if num_classes < 2:
        raise ValueError("confidence needs at least 2 classes")
    entropy = -torch.special.xlogy(probs, probs).sum(dim=1)
    certainty = 1.0 - entropy / math.log(num_classes)
    return (certainty * probs.max(dim=1).values).mean(dim=(1, 2))


def cutmix_box(
    h: int, w: int, lam: float, generator: Generator, *, uniform_centre: bool = False
) -> tuple[int, int, int, int]:
    """One CutMix box (y1, y2, x1, x2), half-open, for an (h, w) image.

    The study's box (default): side int(size * sqrt(1 - lam)), centre drawn from
    randint[size // 8, size) on each axis (so boxes lean to the bottom right), the corners
    centre -/+ side // 2 clipped to the image; the area is less than (1 - lam) h w where it
    clips. ``uniform_centre=True`` (the spec's "Improvements") draws the centre from
    randint[0, size) instead, removing the bias; clipping is kept.
    """
    rng = Rng(generator)
    cut = math.sqrt(1.0 - lam)
    cut_h, cut_w = int(h * cut), int(w * cut)
    low_y, low_x = (0, 0) if uniform_centre else (int(h / 8), int(w / 8))
    cy = rng.integers(low_y, h)
    cx = rng.integers(low_x, w)
    y1, y2 = np.clip([cy - cut_h // 2, cy + cut_h // 2], 0, h)
    x1, x2 = np.clip([cx - cut_w // 2, cx + cut_w // 2], 0, w)
    return int(y1), int(y2), int(x1), int(x2)


@torch.no_grad()
def adaptive_mix(
    x_s: torch.Tensor,
    y_hat: torch.Tensor,
    conf_map: torch.Tensor,
    x_l: torch.Tensor,
    y_l: torch.Tensor,
    image_conf,
    generator: Generator,
    *,
    uniform_centre: bool = False,
    return_info: bool = False,
):
    """AugSeg's confidence-adaptive, label-aided CutMix (``cut_mix_label_adaptive``).

    x_s (B, C, H, W) strong unlabelled images, y_hat (B, H, W) teacher pseudo-labels,
    conf_map (B, H, W) teacher max-probabilities, x_l / y_l the labelled batch (same B, H,
    W), image_conf (B,) from ``image_confidence``. Inputs are not modified.

    Draws, in order: one permutation pi (shared by both stages), lam_l ~ Beta(8, 2) and
    lam_u ~ Beta(4, 4) (one each per call, shared across the batch), then one box per
    sample for labelled and one per sample for unlabelled pasting (``cutmix_box``).

    Stage A, on a copy of the unlabelled batch: for each i, with probability 1 - conf_i,
    paste x_l[pi(i)] inside i's labelled box, with its ground truth labels and confidence 1.
    Stage B: for each i, paste the stage-A copy of sample pi(i) inside i's unlabelled box
    into the *original* sample i (as the study's code: outside that box sample i is its
    un-injected self, so injected labels reach the output only through the pasted boxes).

    Returns (x_mix, y_mix, conf_mix), plus a dict of the draws with ``return_info``.
    """
    rng = Rng(generator)
    b, _, h, w = x_s.shape
    if x_l.shape != x_s.shape or y_l.shape != y_hat.shape:
        raise ValueError(
            f"labelled {tuple(x_l.shape)} and unlabelled {tuple(x_s.shape)} batches differ"
        )
    image_conf = [float(c) for c in image_conf]
    perm = rng.permutation(b)
    lam_l = rng.beta(8.0, 2.0)
    lam_u = rng.beta(4.0, 4.0)
    boxes_l = [cutmix_box(h, w, lam_l, rng, uniform_centre=uniform_centre) for _ in range(b)]
    boxes_u = [cutmix_box(h, w, lam_u, rng, uniform_centre=uniform_centre) for _ in range(b)]

    # stage A: label injection, more likely for images the teacher is unsure about
    a_x, a_y, a_c = x_s.clone(), y_hat.clone(), conf_map.clone()
    injected = []
    for i in range(b):
        if rng.random() > image_conf[i]:
            y1, y2, x1, x2 = boxes_l[i]
            j = int(perm[i])
            a_x[i, :, y1:y2, x1:x2] = x_l[j, :, y1:y2, x1:x2]
            a_y[i, y1:y2, x1:x2] = y_l[j, y1:y2, x1:x2].to(a_y.dtype)
            a_c[i, y1:y2, x1:x2] = 1.0
            injected.append(i)

    # stage B: unlabelled CutMix from the stage-A copy into the original batch
    m_x, m_y, m_c = x_s.clone(), y_hat.clone(), conf_map.clone()
    for i in range(b):
        y1, y2, x1, x2 = boxes_u[i]
        j = int(perm[i])
        m_x[i, :, y1:y2, x1:x2] = a_x[j, :, y1:y2, x1:x2]
        m_y[i, y1:y2, x1:x2] = a_y[j, y1:y2, x1:x2]
        m_c[i, y1:y2, x1:x2] = a_c[j, y1:y2, x1:x2]
    if return_info:
        info = {
            "perm": perm,
            "lam_l": lam_l,
            "lam_u": lam_u,
            "boxes_l": boxes_l,
            "boxes_u": boxes_u,
            "injected": injected,
        }
        return m_x, m_y, m_c, info
    return m_x, m_y, m_c


def class_thresholds(
    conf: torch.Tensor,
    pseudo: torch.Tensor,
    threshold: float,
    num_classes: int,
) -> torch.Tensor:
    """Per-class thresholds: threshold x mean_conf(c) / max over classes of mean_conf.

    mean_conf(c) is the teacher's mean max-probability over the pixels it calls c (ignored
    pixels, labelled 255, enter no class): the stateless, per-batch form of FreeMatch's
    self-adaptive class thresholds. The most confident class keeps ``threshold``; a class
    absent from the batch keeps it too.
    """
    thr = torch.full((num_classes,), float(threshold), device=conf.device)
    means = torch.zeros(num_classes, device=conf.device)
    present = torch.zeros(num_classes, dtype=torch.bool, device=conf.device)
    for c in range(num_classes):
        sel = pseudo == c
        if bool(sel.any()):
            means[c] = conf[sel].float().mean()
            present[c] = True
    if bool(present.any()):
        thr[present] = threshold * means[present] / means[present].max()
    return thr


def _keep(conf: torch.Tensor, pseudo: torch.Tensor, threshold, ignore: int) -> torch.Tensor:
    """Pixels whose pseudo-label enters L_uns; threshold a float or one per class."""
    valid = pseudo != ignore
    if isinstance(threshold, torch.Tensor):
        threshold = threshold[torch.where(valid, pseudo, 0).long()]
    return (conf >= threshold) & valid


def unsupervised_loss(
    logits: torch.Tensor,
    pseudo: torch.Tensor,
    conf: torch.Tensor,
    threshold: float | torch.Tensor,
    ignore: int = IGNORE_LABEL,
) -> torch.Tensor:
    """sum(CE(logits, pseudo) * [conf >= threshold and pseudo != ignore]) / (B * H * W).

    Divided by ALL pixels (as the study), not by the number that pass the threshold.
    ``threshold`` is one float, or a tensor of one per class (``class_thresholds``).
    """
    ce = F.cross_entropy(logits, pseudo.long(), ignore_index=ignore, reduction="none")
    return (ce * _keep(conf, pseudo, threshold, ignore)).sum() / pseudo.numel()


def pseudo_label_ratio(
    conf: torch.Tensor,
    threshold: float | torch.Tensor,
    pseudo: torch.Tensor | None = None,
    ignore: int = IGNORE_LABEL,
) -> float:
    """Fraction of pixels whose pseudo-label enters the unsupervised loss."""
    if pseudo is None:
        return float((conf >= threshold).float().mean())
    return float(_keep(conf, pseudo, threshold, ignore).float().mean())


def uns_ramp(iteration: int, iters_per_epoch: int, sup_only_epochs: int,
             rampup_epochs: int) -> float:
    """Factor on the unsupervised loss: rises linearly from 1 / (N r) at the first
    pseudo-labelled step to 1 after ``rampup_epochs`` r epochs of N iterations; 1 when r = 0."""
    if rampup_epochs <= 0:
        return 1.0
    step = iteration - iters_per_epoch * sup_only_epochs + 1
    return min(1.0, max(step, 0) / (iters_per_epoch * rampup_epochs))


def poly_lr(base_lr: float, iteration: int, total_iters: int, power: float = 0.9) -> float:
    """lr_t = base_lr * (1 - t / T) ** power, every iteration, no warm-up."""
    return base_lr * (1.0 - min(iteration, total_iters) / total_iters) ** power
