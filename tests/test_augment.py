"""Weak (paired) and strong (intensity) augmentations."""

import numpy as np
import pytest
import torch

from magseg_hpc.data.augment import (
    STRONG_POOL,
    op_blur,
    op_contrast,
    op_equalize,
    op_gamma,
    op_posterize,
    op_sharpness,
    op_solarize,
    strong_augment,
    weak_augment,
)
from magseg_hpc.data.rng import Rng


def _blocks(h=48, w=40, seed=0):
    """Piecewise-constant image (8 px blocks) and its thresholded mask."""
    rng = np.random.default_rng(seed)
    levels = rng.random((h // 8 + 1, w // 8 + 1)).astype(np.float32)
    image = np.kron(levels, np.ones((8, 8), np.float32))[:h, :w]
    image = np.where(image > 0.5, 0.9, 0.1).astype(np.float32)
    return image, (image > 0.5).astype(np.uint8)


@pytest.mark.parametrize("seed", range(6))
def test_pairing_exact_without_rescale(seed):
    image, mask = _blocks()
    img, msk = weak_augment(
        image,
        mask,
        crop_size=(32, 24),
        scale_range=(1.0, 1.0),
        hflip=True,
        vflip=True,
        rot90=True,
        generator=np.random.default_rng(seed),
    )
    assert img.shape == msk.shape == (32, 24)
    assert msk.dtype == torch.int64
    assert torch.equal(msk, (img > 0.5).long())


@pytest.mark.parametrize("seed", range(6))
def test_pairing_kept_under_rescale(seed):
    image, mask = _blocks(seed=seed)
    gen = torch.Generator().manual_seed(seed)
    img, msk = weak_augment(image, mask, crop_size=40, generator=gen, vflip=True, rot90=True)
    valid = msk != 255
    agree = (msk[valid] == (img[valid] > 0.5).long()).float().mean()
    assert agree > 0.93  # only block edges blur under bilinear resampling
    assert set(msk.unique().tolist()) <= {0, 1, 255}  # nearest: no invented labels


def test_padding_is_255_in_masks_and_mean_in_images():
    image, mask = _blocks(16, 16)
    img, msk = weak_augment(
        image,
        mask,
        crop_size=(40, 40),
        scale_range=(1.0, 1.0),
        hflip=False,
        generator=np.random.default_rng(0),
    )
    assert (msk[16:, :] == 255).all() and (msk[:, 16:] == 255).all()
    assert torch.equal(msk[:16, :16], torch.from_numpy(mask).long())  # bottom/right padding
    assert torch.allclose(img[20:, 20:], torch.tensor(float(image.mean())))
    img2, _ = weak_augment(
        image,
        None,
        crop_size=40,
        scale_range=(1.0, 1.0),
        generator=np.random.default_rng(0),
        pad_value=0.25,
    )
    assert (img2[20:, 20:] == 0.25).all()


def test_rescale_range_changes_size_before_crop():
    image, mask = _blocks(40, 40)
    img, msk = weak_augment(
        image, mask, crop_size=None, scale_range=(2.0, 2.0), generator=np.random.default_rng(0)
    )
    assert img.shape == msk.shape == (80, 80)


def test_determinism_under_same_generator():
    image, mask = _blocks()
    for make in (lambda: np.random.default_rng(5), lambda: torch.Generator().manual_seed(5)):
        a = weak_augment(image, mask, crop_size=32, rot90=True, generator=make())
        b = weak_augment(image, mask, crop_size=32, rot90=True, generator=make())
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
        s1 = strong_augment(a[0], make(), num_ops=4)
        s2 = strong_augment(a[0], make(), num_ops=4)
        assert torch.equal(s1, s2)
    outs = {
        weak_augment(image, mask, crop_size=32, generator=np.random.default_rng(s))[0].sum().item()
        for s in range(8)
    }
    assert len(outs) > 1  # and different seeds differ


def test_global_rng_not_used():
    image, mask = _blocks()
    torch.manual_seed(0)
    np.random.seed(0)
    a = weak_augment(image, mask, crop_size=32, generator=np.random.default_rng(1))
    torch.manual_seed(123)
    np.random.seed(123)
    b = weak_augment(image, mask, crop_size=32, generator=np.random.default_rng(1))
    assert torch.equal(a[0], b[0])
    with pytest.raises(TypeError):
        weak_augment(image, mask, crop_size=32, generator=None)


def test_strong_ops_stay_in_range_and_do_not_move_pixels():
    image, _ = _blocks(48, 48)
    x = torch.from_numpy(image) * 0.8 + 0.1
    blob = torch.zeros(48, 48)
    blob[20:25, 30:35] = 1.0
    yy, xx = torch.meshgrid(torch.arange(48.0), torch.arange(48.0), indexing="ij")
    rng = np.random.default_rng(0)
    for name, (op, sample) in STRONG_POOL.items():
        for _ in range(5):
            mag = sample(Rng(rng))
            extra = {"noise": (torch.randn(48, 48),), "slice_offset": (torch.tensor([-0.9]),)}
            args = (mag, *extra.get(name, ()))
            y = op(x, *args)
            assert y.shape == x.shape and 0 <= y.min() and y.max() <= 1, name
            if name not in ("blur", "sharpness", "noise"):
                # pointwise: equal inputs give equal outputs (each 8x8 block stays constant)
                for v in x.unique():
                    assert y[x == v].unique().numel() == 1, name
            if name in ("blur", "sharpness"):
                z = op(blob, *args)
                cy = (z * yy).sum() / z.sum()
                cx = (z * xx).sum() / z.sum()
                assert abs(cy - 22) < 0.2 and abs(cx - 32) < 0.2, name  # centre stays put


def test_strong_op_formulas():
    x = torch.tensor([[0.0, 0.25], [0.5, 1.0]])
    torch.testing.assert_close(op_contrast(x, 0.5), 0.4375 + 0.5 * (x - 0.4375))
    assert op_contrast(x, 1.8).max() == 1.0  # contrast above 1 saturates
    torch.testing.assert_close(op_gamma(x, 2.0), x**2)
    assert torch.equal(op_solarize(x, 128), torch.tensor([[0.0, 0.25], [0.5, 0.0]]))
    assert torch.equal(op_solarize(x, 256), x)
    torch.testing.assert_close(
        op_posterize(torch.tensor([[200 / 255]]), 4), torch.tensor([[192 / 255]])
    )
    eq = op_equalize(torch.tensor([[0.1, 0.1], [0.2, 0.9]]))
    torch.testing.assert_close(eq, torch.tensor([[0.0, 0.0], [0.5, 1.0]]))
    flat = torch.full((5, 5), 0.3)
    assert torch.allclose(op_blur(flat, 1.5), flat) and torch.allclose(
        op_sharpness(flat, 0.2), flat
    )


def test_strong_augment_counts_and_shape():
    x = torch.rand(1, 24, 24)
    counts = set()
    for seed in range(60):
        y, ops = strong_augment(x, np.random.default_rng(seed), num_ops=3, return_ops=True)
        assert y.shape == x.shape and y.dtype == torch.float32
        counts.add(len(ops))
    assert counts == {1, 2, 3}
    _, ops = strong_augment(
        x, np.random.default_rng(0), num_ops=4, random_num_ops=False, return_ops=True
    )
    assert len(ops) == 4
    assert "hue" not in STRONG_POOL and "color" not in STRONG_POOL
    y = strong_augment(x.numpy(), np.random.default_rng(0), pool=["identity"])
    assert torch.equal(y, x)


def test_intensity_safe_pool_keeps_the_grey_level_order():
    """On magnetization data the class is the grey level: every op of the intensity_safe pool
    keeps background < dark domain < bright domain (region means), where the study's pool
    has ops that invert or collapse it (solarize, brightness...)."""
    from magseg_hpc.data.augment import STRONG_POOLS, resolve_strong_pool

    rng = np.random.default_rng(0)
    levels = torch.tensor([0.0, 0.3, 0.9])
    regions = torch.arange(3).repeat_interleave(24 * 8).reshape(24, 24)
    x = levels[regions] + 0.05 * torch.from_numpy(rng.standard_normal((24, 24))).float()
    x = x.clamp(0, 1)

    def order_kept(y):
        means = [float(y[regions == c].mean()) for c in range(3)]
        return means[0] < means[1] < means[2]

    for seed in range(200):
        y = strong_augment(x, np.random.default_rng(seed), num_ops=3,
                           pool=resolve_strong_pool("intensity_safe"))
        assert order_kept(y), seed
    assert not all(order_kept(strong_augment(x, np.random.default_rng(s), num_ops=3))
                   for s in range(200))
    assert resolve_strong_pool(None) == list(STRONG_POOL) == list(STRONG_POOLS["study"])


def test_slice_offset_shifts_each_context_slice_as_a_whole():
    """A reconstruction's per-slice offsets: each plane of a (C, H, W) slice stack moves by
    its own constant (at most 0.2 in [0, 1] units), so the planes differ from one another
    while within a plane every grey level keeps its distance to the others."""
    x = 0.3 + 0.4 * torch.rand(5, 16, 16)  # at least 0.2 away from 0 and 1: no clamping
    shifts = []
    for seed in range(40):
        y, ops = strong_augment(x, np.random.default_rng(seed), num_ops=1,
                                random_num_ops=False, pool=["slice_offset"], return_ops=True)
        d = y - x
        per_plane = d.mean(dim=(1, 2))
        # one constant per plane: the structure inside each plane is untouched
        torch.testing.assert_close(d, per_plane[:, None, None].expand_as(d))
        assert float(per_plane.abs().max()) <= sum(m for _, m in ops) + 1e-6
        shifts.append(per_plane)
    shifts = torch.stack(shifts)
    assert float(shifts.std(dim=1).mean()) > 0.01  # the context slices move independently
    assert float(shifts.min()) < -0.05 < 0.05 < float(shifts.max())  # both directions
    flat = strong_augment(torch.zeros(8, 8) + 0.95, np.random.default_rng(1), num_ops=3,
                          random_num_ops=False, pool=["slice_offset"])
    assert float(flat.max()) <= 1.0 and float(flat.min()) >= 0.0
