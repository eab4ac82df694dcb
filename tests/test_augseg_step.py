"""augseg_step itself: the unsupervised branch must contribute, and the student must learn
from the teacher's pseudo-labels (a test that fails if that branch stops working)."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY_MODEL
from torch import nn

from magseg_hpc.config import config_from_dict
from magseg_hpc.train.distributed import DistEnv
from magseg_hpc.train.steps import augseg_step


class _SignNet(nn.Module):
    """1 -> 3 classes per pixel: a 1x1 convolution (the teacher's is set to be confident)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 1)

    def forward(self, x):
        return self.conv(x)


def _cfg(**train):
    return config_from_dict({
        "model": TINY_MODEL,
        "data": {"volume": "unused.zarr"},
        "train": {"threshold": 0.95, "sup_only_epochs": 1, "uns_weight": 1.0,
                  "cutmix_prob": 0.0, "device": "cpu", "precision": "fp32", **train},
    })


def _setup(seed=0):
    torch.manual_seed(seed)
    teacher = _SignNet()
    with torch.no_grad():  # class 2 for x > 0, class 1 for x < 0, very sure of it
        teacher.conv.weight.copy_(torch.tensor([0.0, -20.0, 20.0]).view(3, 1, 1, 1))
        teacher.conv.bias.copy_(torch.tensor([-5.0, 0.0, 0.0]))
    student = _SignNet()
    opt = torch.optim.SGD(student.parameters(), lr=0.5)
    x_l = torch.randn(2, 1, 8, 8)
    y_l = torch.where(x_l[:, 0] > 0, 2, 1)
    x_u = torch.randn(2, 1, 8, 8)
    valid = torch.ones(2, 8, 8, dtype=torch.bool)
    env = DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), backend=None)
    return teacher, student, opt, (x_l, y_l), (x_u, x_u.clone(), valid), env


def test_unsupervised_branch_contributes_after_the_supervised_epochs():
    teacher, student, opt, bl, bu, env = _setup()
    cfg = _cfg()
    g = torch.Generator().manual_seed(0)
    sup_only = augseg_step(student, teacher, opt, bl, bu, cfg=cfg, env=env, epoch=0, generator=g)
    assert sup_only["loss_uns"] == 0 and sup_only["pseudo_ratio"] == 0
    stats = augseg_step(student, teacher, opt, bl, bu, cfg=cfg, env=env, epoch=1, generator=g)
    assert stats["loss_uns"] > 0
    assert stats["pseudo_ratio"] > 0.5  # the teacher is confident on most pixels
    assert stats["loss"] == pytest.approx(stats["loss_sup"] + stats["loss_uns"], rel=1e-6)


def test_student_learns_from_pseudo_labels_alone():
    """Labelled images of zeros (half class 1, half class 2) give the weights no gradient:
    only L_uns can teach the student the teacher's sign rule."""
    teacher, student, opt, (x_l, y_l), bu, env = _setup(seed=1)
    x_l = torch.zeros_like(x_l)
    y_l = 1 + (torch.arange(y_l.numel()) % 2).view_as(y_l)
    cfg = _cfg(sup_only_epochs=0)
    g = torch.Generator().manual_seed(0)

    def agreement():
        with torch.no_grad():
            x = torch.randn(4, 1, 16, 16, generator=torch.Generator().manual_seed(5))
            return float((student(x).argmax(1) == teacher(x).argmax(1)).float().mean())

    before = agreement()
    for _ in range(30):
        stats = augseg_step(student, teacher, opt, (x_l, y_l), bu, cfg=cfg, env=env, epoch=0,
                            generator=g)
        assert stats["loss_uns"] > 0 and stats["pseudo_ratio"] > 0
    assert agreement() > max(before, 0.9)


def test_class_thresholds_keep_pseudo_labels_of_the_class_the_teacher_is_unsure_of():
    """A teacher sure of class 2 (x > 0) but only ~0.9 sure of class 1: with one global
    0.95 threshold class 1 gets no pseudo-label; with class thresholds it does."""
    teacher, student, opt, bl, (x_u, _, valid), env = _setup()
    x_u = torch.where(x_u > 0, 1.0, -1.0)  # two grey levels, one per class
    with torch.no_grad():  # logits at x = -1: class 1 by 2.2 nats (p ~ 0.9); x = +1: sure
        teacher.conv.weight.copy_(torch.tensor([0.0, -1.0, 20.0]).view(3, 1, 1, 1))
        teacher.conv.bias.copy_(torch.tensor([-1.2, 0.0, 0.0]))
    bu = (x_u, x_u.clone(), valid)
    minus_share = float((x_u < 0).float().mean())
    ratios = {}
    for flag in (False, True):
        g = torch.Generator().manual_seed(0)
        stats = augseg_step(student, teacher, opt, bl, bu, cfg=_cfg(class_thresholds=flag),
                            env=env, epoch=1, generator=g)
        ratios[flag] = stats["pseudo_ratio"]
    assert ratios[False] == pytest.approx(1 - minus_share)
    assert ratios[True] == pytest.approx(1.0)
