"""One training step: AugSeg (the method of Zhao et al., CVPR 2023, "Augmentation Matters",
section 3; its formulas live in ``magseg_hpc.train.augseg``, our reading of it in
docs/commands.md) or the supervised baseline, and the checks that stop a diverged run before
it saves anything."""

from __future__ import annotations

import math
from dataclasses import replace

import torch
from torch import nn

from magseg_hpc.classes import IGNORE_LABEL
from magseg_hpc.config import (
    ExperimentConfig,
)
from magseg_hpc.errors import MagsegError
from magseg_hpc.models.checkpoint import nonfinite_tensors
from magseg_hpc.precision import autocast as precision_autocast
from magseg_hpc.precision import resolve_precision
from magseg_hpc.train import distributed as dist_util
from magseg_hpc.train.augseg import (
    adaptive_mix,
    class_thresholds,
    image_confidence,
    pseudo_label_ratio,
    unsupervised_loss,
)
from magseg_hpc.train.distributed import DistEnv
from magseg_hpc.train.losses import supervised_loss


def with_resolved_precision(cfg: ExperimentConfig, device) -> ExperimentConfig:
    """``train.precision`` auto decided for ``device`` (bf16 where it is native): the one
    decision of a run, held by the returned config (the steps, the fusion check, the
    checkpoints)."""
    choice = resolve_precision(cfg.train.precision, device)
    if choice == cfg.train.precision:
        return cfg
    return replace(cfg, train=replace(cfg.train, precision=choice))


def autocast(env: DistEnv, cfg: ExperimentConfig):
    """The forwards' precision: train.precision as the run decided it
    (``with_resolved_precision``); losses stay fp32."""
    return precision_autocast(env.device, cfg.train.precision)


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
