"""Each AugSeg building block against its formula (spec section 3)."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from magseg_hpc.train.augseg import (
    adaptive_mix,
    class_thresholds,
    cutmix_box,
    ema_decay,
    ema_update,
    image_confidence,
    poly_lr,
    pseudo_label_ratio,
    unsupervised_loss,
)


def test_ema_decay_schedule():
    n = 655  # VOC-92 iterations per epoch
    assert ema_decay(0, n, 0, 0.999) == 0.0
    assert ema_decay(n - 1, n, 0, 0.999) == 0.0  # all of epoch 0: teacher = student
    assert ema_decay(n, n, 0, 0.999) == pytest.approx(1 - 1 / (n + 1))  # ~0.9985
    assert ema_decay(n + 100, n, 0, 0.999) == pytest.approx(1 - 1 / (n + 101))
    assert ema_decay(998, n, 0, 0.999) < 0.999
    assert ema_decay(999, n, 0, 0.999) == pytest.approx(0.999)  # 1 - 1/1000: the cap
    assert ema_decay(10 * n, n, 0, 0.996) == 0.996
    # with a supervised-only phase of 2 epochs the count restarts after it
    assert ema_decay(3 * n - 1, n, 2, 0.999) == 0.0
    assert ema_decay(3 * n, n, 2, 0.999) == pytest.approx(1 - 1 / (n + 1))
    assert ema_decay(3 * n + 5, n, 2, 0.9999) == pytest.approx(1 - 1 / (n + 6))


def test_mean_teacher_schedule_averages_from_the_first_pseudo_label():
    n = 100
    mt = "mean_teacher"
    # supervised-only epochs 0..2: a copy; epoch 2 is the study's copy epoch, not this one's
    assert ema_decay(2 * n - 1, n, 2, 0.99, mt) == 0.0
    assert ema_decay(2 * n, n, 2, 0.99, mt) == 0.99  # min(1 - 1/201, 0.99): averaging at once
    assert ema_decay(2 * n, n, 2, 0.99) == 0.0  # the study copies through epoch 2
    assert ema_decay(5, n, 0, 0.99, mt) == pytest.approx(1 - 1 / 6)  # from scratch: the ramp


def test_average_schedule_averages_from_the_first_step():
    n = 100
    assert ema_decay(0, n, 3, 0.99, "average") == 0.0  # the first step: a copy
    assert ema_decay(1, n, 3, 0.99, "average") == pytest.approx(0.5)
    assert ema_decay(150, n, 3, 0.99, "average") == 0.99  # supervised-only epochs included


def _net():
    return nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2))


def test_ema_update_params_and_buffers():
    torch.manual_seed(0)
    teacher, student = _net(), _net()
    student.train()(torch.randn(4, 1, 8, 8))  # moves BN stats and num_batches_tracked
    t0 = {k: v.clone() for k, v in teacher.state_dict().items()}
    s0 = {k: v.clone() for k, v in student.state_dict().items()}
    ema_update(teacher, student, 0.9)
    for k, v in teacher.state_dict().items():
        if v.is_floating_point():
            torch.testing.assert_close(v, 0.9 * t0[k] + 0.1 * s0[k])
        else:
            assert torch.equal(v, s0[k]) and v.dtype == torch.int64  # copied, not blended
    assert not torch.equal(teacher[1].running_mean, t0["1.running_mean"])
    ema_update(teacher, student, 0.0)  # epoch 0: exact copy
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, s0[k])


def test_image_confidence_hand_cases():
    c = 3
    uniform = torch.full((1, c, 4, 5), 1 / c)
    one_hot = F.one_hot(torch.randint(0, c, (1, 4, 5)), c).permute(0, 3, 1, 2).float()
    conf = image_confidence(torch.cat([uniform, one_hot]))
    assert conf.shape == (2,)
    assert conf[0] == pytest.approx(0.0, abs=1e-6)
    assert conf[1] == pytest.approx(1.0)
    p = torch.tensor([0.5, 0.5, 0.0]).view(1, 3, 1, 1)
    expected = (1 - math.log(2) / math.log(3)) * 0.5
    assert image_confidence(p)[0] == pytest.approx(expected)
    # mean over pixels: half confident, half uniform
    mixed = torch.cat([uniform[..., :2], one_hot[..., 2:4]], dim=-1)
    assert image_confidence(mixed)[0] == pytest.approx(0.5, abs=1e-6)


def _expected_clipped_area(a, b, size):
    """E[area]/size^2 of the spec's box, with lam ~ Beta(a, b): for each lam the side is
    int(size sqrt(1 - lam)), the centre uniform on {size//8..size-1}, edges clipped."""
    from scipy import integrate, stats

    centres = np.arange(size // 8, size)

    def area(lam):
        half = int(size * math.sqrt(1 - lam)) // 2
        length = np.minimum(centres + half, size) - np.maximum(centres - half, 0)
        return (length.mean() / size) ** 2

    value, _ = integrate.quad(lambda lam: area(lam) * stats.beta.pdf(lam, a, b), 0, 1, limit=200)
    return value


def test_cutmix_box_area_matches_beta_expectation():
    rng = np.random.default_rng(0)
    h = w = 64
    for a, b in [(8, 2), (4, 4)]:
        areas = []
        for _ in range(4000):
            lam = rng.beta(a, b)
            y1, y2, x1, x2 = cutmix_box(h, w, lam, rng)
            assert 0 <= y1 <= y2 <= h and 0 <= x1 <= x2 <= w
            # unclipped, the box is the spec's side: 2 * (int(size sqrt(1 - lam)) // 2)
            side = 2 * (int(h * math.sqrt(1 - lam)) // 2)
            assert y2 - y1 <= side and x2 - x1 <= side
            areas.append((y2 - y1) * (x2 - x1) / (h * w))
        mean, sem = float(np.mean(areas)), float(np.std(areas) / np.sqrt(len(areas)))
        assert mean < 1 - a / (a + b)  # E[1 - lam] = 0.2 and 0.5 unclipped; clipping shrinks
        assert abs(mean - _expected_clipped_area(a, b, h)) < 4 * sem, (a, b, mean)


def test_cutmix_box_centre_bias_and_uniform_variant():
    rng = torch.Generator().manual_seed(0)
    h = w = 80

    def centres(uniform):
        boxes = [cutmix_box(h, w, 0.99, rng, uniform_centre=uniform) for _ in range(3000)]
        return np.array([((y1 + y2) / 2, (x1 + x2) / 2) for y1, y2, x1, x2 in boxes])

    faithful, uniform = centres(False), centres(True)
    assert faithful.min() >= h / 8 - 5  # never starts near the top-left
    assert faithful.mean() > h / 2 + 2  # leans to the bottom right
    assert abs(uniform.mean() - h / 2) < 2
    assert uniform.min() < 5


def _batch(b=4, h=32, w=32):
    g = torch.Generator().manual_seed(1)
    x_s = torch.rand(b, 1, h, w, generator=g)
    y_hat = torch.randint(0, 3, (b, h, w), generator=g)
    conf = torch.rand(b, h, w, generator=g) * 0.5
    x_l = 10 + torch.rand(b, 1, h, w, generator=g)  # labelled pixels are > 10: easy to spot
    y_l = torch.full((b, h, w), 7)  # a label the teacher never predicts
    return x_s, y_hat, conf, x_l, y_l


def test_label_injection_never_when_confident():
    x_s, y_hat, conf, x_l, y_l = _batch()
    for seed in range(20):
        xm, ym, cm = adaptive_mix(
            x_s, y_hat, conf, x_l, y_l, torch.ones(4), np.random.default_rng(seed)
        )
        assert (xm < 10).all() and (ym != 7).all() and (cm < 1).all()


def test_label_injection_when_unsure_carries_gt_and_confidence_one():
    x_s, y_hat, conf, x_l, y_l = _batch()
    saw_injected = False
    for seed in range(20):
        xm, ym, cm, info = adaptive_mix(
            x_s,
            y_hat,
            conf,
            x_l,
            y_l,
            torch.zeros(4),
            np.random.default_rng(seed),
            return_info=True,
        )
        assert info["injected"] == [0, 1, 2, 3]
        from_labelled = xm[:, 0] > 10
        # every labelled pixel carries its ground truth and confidence 1, and vice versa
        assert torch.equal(from_labelled, ym == 7)
        assert (cm[from_labelled] == 1).all() and (cm[~from_labelled] < 1).all()
        # those pixels lie inside both boxes: i's unlabelled box and pi(i)'s labelled box
        for i in range(4):
            j = int(info["perm"][i])
            inside = torch.zeros(32, 32, dtype=torch.bool)
            uy1, uy2, ux1, ux2 = info["boxes_u"][i]
            ly1, ly2, lx1, lx2 = info["boxes_l"][j]
            inside[max(uy1, ly1) : min(uy2, ly2), max(ux1, lx1) : min(ux2, lx2)] = True
            assert torch.equal(from_labelled[i], inside)
            saw_injected |= bool(inside.any())
            outside = torch.ones(32, 32, dtype=torch.bool)
            outside[uy1:uy2, ux1:ux2] = False
            assert torch.equal(xm[i, 0][outside], x_s[i, 0][outside])  # rest untouched
    assert saw_injected


def test_adaptive_mix_stage_b_takes_pseudo_labels_from_the_permuted_sample():
    x_s, y_hat, conf, x_l, y_l = _batch()
    xm, ym, cm, info = adaptive_mix(
        x_s,
        y_hat,
        conf,
        x_l,
        y_l,
        torch.ones(4),
        torch.Generator().manual_seed(3),
        return_info=True,
    )
    for i in range(4):
        j = int(info["perm"][i])
        y1, y2, x1, x2 = info["boxes_u"][i]
        assert torch.equal(xm[i, :, y1:y2, x1:x2], x_s[j, :, y1:y2, x1:x2])
        assert torch.equal(ym[i, y1:y2, x1:x2], y_hat[j, y1:y2, x1:x2])
        assert torch.equal(cm[i, y1:y2, x1:x2], conf[j, y1:y2, x1:x2])
    assert torch.equal(x_s, _batch()[0])  # inputs not modified


def test_adaptive_mix_deterministic_under_generator():
    args = _batch()
    a = adaptive_mix(*args, torch.full((4,), 0.5), torch.Generator().manual_seed(9))
    b = adaptive_mix(*args, torch.full((4,), 0.5), torch.Generator().manual_seed(9))
    for u, v in zip(a, b, strict=True):
        assert torch.equal(u, v)


def test_unsupervised_loss_normalised_by_all_pixels():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 4, 5)
    pseudo = torch.randint(0, 3, (2, 4, 5))
    conf = torch.rand(2, 4, 5)
    pseudo[0, 0, 0] = 255
    conf[0, 0, 0] = 1.0  # confident but ignore label: excluded
    ce = F.cross_entropy(logits, pseudo.clamp(max=2), reduction="none")
    keep = (conf >= 0.5) & (pseudo != 255)
    expected = (ce * keep).sum() / 40
    got = unsupervised_loss(logits, pseudo, conf, 0.5)
    torch.testing.assert_close(got, expected)
    # not the mean over kept pixels
    assert got < (ce * keep).sum() / keep.sum()
    assert unsupervised_loss(logits, pseudo, conf, 1.1) == 0
    assert pseudo_label_ratio(conf, 0.5, pseudo) == pytest.approx(float(keep.float().mean()))
    assert pseudo_label_ratio(conf, -0.1) == 1.0


def test_class_thresholds_scale_by_each_class_mean_confidence():
    conf = torch.tensor([[0.99, 0.97, 0.80, 0.70, 0.90, 0.10]])
    pseudo = torch.tensor([[0, 0, 1, 1, 2, 255]])  # the ignored pixel enters no mean
    thr = class_thresholds(conf, pseudo, 0.95, num_classes=4)
    means = torch.tensor([0.98, 0.75, 0.90])
    torch.testing.assert_close(thr[:3], 0.95 * means / 0.98)
    assert thr[3] == pytest.approx(0.95)  # absent from the batch: the global threshold
    # class 1's pixels (0.80, 0.70) pass its lowered threshold (0.727) only where >= it
    keep = torch.tensor([[True, True, True, False, True, False]])
    assert pseudo_label_ratio(conf, thr, pseudo) == pytest.approx(float(keep.float().mean()))
    assert pseudo_label_ratio(conf, 0.95, pseudo) == pytest.approx(2 / 6)
    logits = torch.randn(1, 4, 1, 6)
    ce = F.cross_entropy(logits, pseudo.clamp(max=3).view(1, 1, 6), reduction="none")
    torch.testing.assert_close(unsupervised_loss(logits, pseudo.view(1, 1, 6),
                                                 conf.view(1, 1, 6), thr),
                               (ce * keep.view(1, 1, 6)).sum() / 6)


def test_poly_lr():
    assert poly_lr(0.01, 0, 100) == 0.01
    assert poly_lr(0.01, 50, 100) == pytest.approx(0.01 * 0.5**0.9)
    assert poly_lr(0.01, 99, 100) == pytest.approx(0.01 * 0.01**0.9)
    assert poly_lr(0.01, 100, 100) == 0.0
    assert poly_lr(1.0, 30, 100, power=1.0) == pytest.approx(0.7)
