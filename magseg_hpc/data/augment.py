"""Weak (paired, geometric) and strong (intensity) augmentations for 2D grey slices.

Every function draws only from the generator passed in (``torch.Generator`` or
``numpy.random.Generator``, see ``magseg_hpc.data.rng``), never from a global RNG.
Images are float slices in [0, 1] (``normalize.scale_to_unit`` output); ``standardize``
comes after augmentation. Masks hold class ids with 255 = ignore.

Weak augmentation (labelled and unlabelled images, AugSeg section 2), in this order:
rescale by s ~ U[scale_range] (bilinear with antialiasing for images, nearest for masks),
horizontal flip p=0.5, optional vertical flip p=0.5, optional rotation by k*90 degrees
(k ~ U{0..3}), pad bottom/right up to the crop size (image with ``pad_value``, default the
slice's own mean; mask with 255), random crop.

Strong augmentation (unlabelled images only) is intensity-only, so the strong view stays
pixel-aligned with the weak one. k ~ U{1..num_ops} operations (k = num_ops when
``random_num_ops`` is off) are drawn with replacement from this pool; magnitudes are drawn
uniformly at call time:

| op | effect on x in [0, 1] | magnitude | source |
|---|---|---|---|
| identity | x | - | AugSeg |
| autocontrast | (x - min) / (max - min) | - | AugSeg |
| equalize | histogram equalisation on 256 levels | - | AugSeg |
| blur | Gaussian blur | sigma ~ U[0.1, 2.0] px | AugSeg |
| contrast | m + f (x - m), m = mean(x) | f ~ U[0.05, 0.95] | AugSeg |
| contrast_up | m + f (x - m) | f ~ U[1.0, 1.8] | new: contrast above 1 |
| brightness | f x | f ~ U[0.05, 0.95] | AugSeg |
| sharpness | s + f (x - s), s = 3x3 PIL smooth | f ~ U[0.05, 0.95] | AugSeg |
| posterize | keep the top b bits of round(255 x) | b ~ U{4..7} | AugSeg |
| solarize | 1 - x where round(255 x) >= t | t ~ U{1..256} | AugSeg |
| gamma | x ** g | g ~ U[0.5, 2.0] | new |
| noise | x + sigma N(0, 1) | sigma ~ U[0.01, 0.1] | new |

All results are clipped to [0, 1]. AugSeg's colour and hue operations are dropped: they do
nothing on grey images (the reference notes about 4 of its 11 operations are no-ops there).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from magseg_hpc.classes import IGNORE_LABEL
from magseg_hpc.data.rng import Rng
from magseg_hpc.errors import MagsegError

Generator = torch.Generator | np.random.Generator


def _as_tensor(x, dtype, channels: bool = False) -> torch.Tensor:
    t = torch.from_numpy(np.ascontiguousarray(x)) if isinstance(x, np.ndarray) else x
    if t.ndim != 2 and not (channels and t.ndim == 3):
        raise ValueError(f"expected a 2D slice, got shape {tuple(t.shape)}")
    return t.to(dtype)


def _pair(size) -> tuple[int, int]:
    return (int(size), int(size)) if isinstance(size, int | np.integer) else tuple(map(int, size))


def weak_augment(
    image,
    mask=None,
    *,
    crop_size: int | Sequence[int] | None,
    generator: Generator,
    scale_range: Sequence[float] = (0.5, 2.0),
    hflip: bool = True,
    vflip: bool = False,
    rot90: bool = False,
    pad_value: float | None = None,
    focus=None,
    focus_prob: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Paired geometric augmentation of one slice.

    image: (H, W) or (C, H, W) (a slice and its neighbours) float numpy/torch in [0, 1];
    mask: (H, W) integer class ids or None.
    Returns (image float32 (h, w) or (C, h, w), mask int64 (h, w) or None) with (h, w) =
    crop_size (the rescaled size when crop_size is None). ``focus`` (H, W) bool: with
    probability ``focus_prob`` the crop is placed so that it holds a random focus pixel
    (foreground oversampling, as nnU-Net does: a small sample in a large field of view is
    then seen in most crops); otherwise, or when no focus pixel survives, uniformly.
    Padding is 255 in the mask; to learn where an unlabelled image was padded, pass
    ``mask=np.zeros(shape, np.uint8)``.
    ``pad_value`` None pads the image with its own mean; pass normalization["mean"] to pad
    with what ``standardize`` maps to 0 (AugSeg's ImageNet-mean padding).
    """
    rng = Rng(generator)
    img = _as_tensor(image, torch.float32, channels=True)
    plain = img.ndim == 2
    img = img[None, None] if plain else img[None]
    msk = None if mask is None else _as_tensor(mask, torch.float32)[None, None]
    if msk is not None and msk.shape[-2:] != img.shape[-2:]:
        raise ValueError(f"image {tuple(img.shape[2:])} and mask {tuple(msk.shape[2:])} differ")
    # Drawn first whenever focus is on, so the other draws do not depend on the focus mask.
    use_focus = focus_prob > 0 and rng.random() < focus_prob
    foc = None
    if focus is not None and use_focus:
        foc = _as_tensor(np.asarray(focus, np.float32), torch.float32)[None, None]

    img, msk, foc = _rescale(img, msk, foc, rng.uniform(*scale_range))
    img, msk, foc = _flip_rotate(img, msk, foc, rng, hflip=hflip, vflip=vflip, rot90=rot90)
    if crop_size is not None:
        img, msk = _crop(img, msk, foc, _pair(crop_size), rng, pad_value)
    img = (img[0, 0] if plain else img[0]).contiguous()
    return img, None if msk is None else msk[0, 0].round().to(torch.int64).contiguous()


def _each(fn, *tensors):
    """``fn`` applied to each tensor given (None stays None)."""
    return tuple(None if t is None else fn(t) for t in tensors)


def _rescale(img, msk, foc, s: float):
    """Image, mask and focus (1, C, H, W) rescaled by ``s``: bilinear with antialiasing for
    the image, nearest for the others."""
    h, w = img.shape[-2:]
    size = (max(1, round(h * s)), max(1, round(w * s)))
    if size == (h, w):
        return img, msk, foc
    img = F.interpolate(img, size=size, mode="bilinear", align_corners=False, antialias=True)
    return (img, *_each(lambda t: F.interpolate(t, size=size, mode="nearest-exact"), msk, foc))


def _flip_rotate(img, msk, foc, rng: Rng, *, hflip: bool, vflip: bool, rot90: bool):
    """A horizontal flip p=0.5, a vertical one p=0.5, a rotation by k*90 degrees (each when
    asked; drawn in that order) of all three alike."""
    flips = []
    if hflip and rng.random() < 0.5:
        flips.append(-1)
    if vflip and rng.random() < 0.5:
        flips.append(-2)
    k = rng.integers(0, 4) if rot90 else 0
    if flips:
        img, msk, foc = _each(lambda t: t.flip(flips), img, msk, foc)
    if k:
        img, msk, foc = _each(lambda t: t.rot90(k, (-2, -1)), img, msk, foc)
    return img, msk, foc


def _crop(img, msk, foc, crop: tuple[int, int], rng: Rng, pad_value: float | None):
    """Pad bottom/right up to ``crop`` (the image with ``pad_value`` or its mean, the mask with
    255), then a random crop of image and mask; with a focus, one that holds a random focus
    pixel."""
    ch, cw = crop
    h, w = img.shape[-2:]
    ph, pw = max(ch - h, 0), max(cw - w, 0)
    if ph or pw:
        fill = float(img.mean()) if pad_value is None else float(pad_value)
        img = F.pad(img, (0, pw, 0, ph), value=fill)
        if msk is not None:
            msk = F.pad(msk, (0, pw, 0, ph), value=float(IGNORE_LABEL))
    h, w = img.shape[-2:]
    y0 = rng.integers(0, h - ch + 1)
    x0 = rng.integers(0, w - cw + 1)
    if foc is not None:
        points = torch.nonzero(foc[0, 0] > 0.5)
        if len(points):
            py, px = (int(v) for v in points[rng.integers(0, len(points))])
            # a uniform crop among those that hold (py, px)
            y0 = min(max(py - ch + 1 + int(y0 * ch / max(h - ch + 1, 1)), 0), h - ch)
            x0 = min(max(px - cw + 1 + int(x0 * cw / max(w - cw + 1, 1)), 0), w - cw)
    return _each(lambda t: t[..., y0 : y0 + ch, x0 : x0 + cw], img, msk)


# ---- strong (intensity) operations: f(x, magnitude) on float (H, W) in [0, 1] -------------


def _filter(x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """2D filter of (H, W) or of each channel of (C, H, W)."""
    kh, kw = kernel.shape
    planes = x.reshape(-1, 1, *x.shape[-2:])
    padded = F.pad(planes, (kw // 2, kw // 2, kh // 2, kh // 2), mode="replicate")
    return F.conv2d(padded, kernel[None, None].to(x.dtype)).reshape(x.shape)


def op_identity(x, _=None):
    return x


def op_autocontrast(x, _=None):
    lo, hi = x.min(), x.max()
    return (x - lo) / (hi - lo) if hi > lo else x


def op_equalize(x, _=None):
    q = (x.clamp(0, 1) * 255).round().long()
    cdf = torch.bincount(q.flatten(), minlength=256).cumsum(0)
    n, cdf_min = cdf[-1], cdf[cdf > 0][0]
    if n == cdf_min:  # a single grey level: nothing to spread
        return x
    lut = (cdf - cdf_min).to(x.dtype) / float(n - cdf_min)
    return lut[q].clamp(0, 1)


def op_blur(x, sigma):
    radius = max(1, math.ceil(3 * sigma))
    t = torch.arange(-radius, radius + 1, dtype=x.dtype)
    g = torch.exp(-0.5 * (t / sigma) ** 2)
    g = g / g.sum()
    return _filter(_filter(x, g[None, :]), g[:, None])


def op_contrast(x, factor):
    m = x.mean()
    return (m + factor * (x - m)).clamp(0, 1)


def op_brightness(x, factor):
    return (x * factor).clamp(0, 1)


_SMOOTH = torch.tensor([[1.0, 1.0, 1.0], [1.0, 5.0, 1.0], [1.0, 1.0, 1.0]]) / 13.0


def op_sharpness(x, factor):
    s = _filter(x, _SMOOTH)
    return (s + factor * (x - s)).clamp(0, 1)


def op_posterize(x, bits):
    q = (x.clamp(0, 1) * 255).round().to(torch.uint8)
    keep = (0xFF << (8 - int(bits))) & 0xFF
    return (q & keep).to(x.dtype) / 255.0


def op_solarize(x, threshold):
    q = (x.clamp(0, 1) * 255).round()
    return torch.where(q >= threshold, 1.0 - x, x)


def op_gamma(x, g):
    return x.clamp(0, 1) ** g


def op_noise(x, sigma, noise=None):
    return (x + sigma * noise).clamp(0, 1)


def op_slice_offset(x, amplitude, offsets=None):
    """Each plane (each context slice of (C, H, W)) shifted by amplitude x its offset in
    [-1, 1] (``offsets``: one per plane): a reconstruction's per-slice offsets (flat-field
    and projection normalisation errors) move a whole slice and keep its dark domains
    darker than its bright ones."""
    shift = offsets.reshape(-1, 1, 1) if x.ndim == 3 else offsets.reshape(())
    return (x + amplitude * shift.to(x.dtype)).clamp(0, 1)


# name -> (op, magnitude sampler)
STRONG_POOL: dict[str, tuple[Callable, Callable[[Rng], float | None]]] = {
    "identity": (op_identity, lambda r: None),
    "autocontrast": (op_autocontrast, lambda r: None),
    "equalize": (op_equalize, lambda r: None),
    "blur": (op_blur, lambda r: r.uniform(0.1, 2.0)),
    "contrast": (op_contrast, lambda r: r.uniform(0.05, 0.95)),
    "contrast_up": (op_contrast, lambda r: r.uniform(1.0, 1.8)),
    "brightness": (op_brightness, lambda r: r.uniform(0.05, 0.95)),
    "sharpness": (op_sharpness, lambda r: r.uniform(0.05, 0.95)),
    "posterize": (op_posterize, lambda r: r.integers(4, 8)),
    "solarize": (op_solarize, lambda r: r.integers(1, 257)),
    "gamma": (op_gamma, lambda r: r.uniform(0.5, 2.0)),
    "noise": (op_noise, lambda r: r.uniform(0.01, 0.1)),
    "slice_offset": (op_slice_offset, lambda r: r.uniform(0.05, 0.2)),
}


# Pools by name (train.strong_ops). "intensity_safe": operations after which the masked
# background is still the darkest, a dark domain darker than a bright one (blur, sharpening,
# added noise, a per-slice offset). On magnetization data the class is the grey level:
# solarize, brightness, contrast, autocontrast, equalize and gamma teach the student that an
# inverted or rescaled domain keeps its label, and posterize merges dark domains into a zero
# background. A slice_offset moves a whole slice, as a reconstruction's per-slice offsets do:
# the student learns that such a slice keeps its classes (`elongated` tuning seeds 5 and 6,
# benchmarks/results/elongated_tuning.md).
STRONG_POOLS: dict[str, tuple[str, ...]] = {
    "study": tuple(STRONG_POOL),
    "intensity_safe": ("identity", "blur", "sharpness", "noise", "slice_offset"),
}


def resolve_strong_pool(spec: str | Sequence[str] | None) -> list[str]:
    """A pool name ("study", "intensity_safe"), a list of op names, or None (the study's)."""
    if spec is None:
        return list(STRONG_POOL)
    if isinstance(spec, str):
        if spec not in STRONG_POOLS:
            raise MagsegError(f"train.strong_ops: unknown pool {spec!r}; choose from "
                              f"{list(STRONG_POOLS)} or list operations from {list(STRONG_POOL)}")
        return list(STRONG_POOLS[spec])
    names = list(spec)
    unknown = [n for n in names if n not in STRONG_POOL]
    if not names or unknown:
        problem = f"unknown operations {unknown}" if unknown else "an empty list"
        raise MagsegError(f"train.strong_ops: {problem}; name operations from "
                          f"{list(STRONG_POOL)}")
    return names


def strong_augment(
    image01,
    generator: Generator,
    *,
    num_ops: int = 3,
    random_num_ops: bool = True,
    pool: Sequence[str] | None = None,
    return_ops: bool = False,
):
    """Intensity-only strong augmentation of one float slice in [0, 1] (numpy or torch,
    (H, W), or (C, H, W) for a slice and its neighbours, which all get the same operations);
    returns a float32 tensor of the same shape, still in [0, 1].

    With ``return_ops`` also returns the applied [(name, magnitude), ...] for logging.
    """
    rng = Rng(generator)
    names = list(STRONG_POOL) if pool is None else list(pool)
    unknown = [n for n in names if n not in STRONG_POOL]
    if unknown:
        raise ValueError(f"unknown strong ops {unknown}; choose from {list(STRONG_POOL)}")
    x = torch.from_numpy(np.asarray(image01)) if isinstance(image01, np.ndarray) else image01
    shape = x.shape
    x = x.to(torch.float32)
    x = x.reshape(shape[-2:]) if x.ndim < 3 or shape[0] == 1 else x
    k = rng.integers(1, num_ops + 1) if random_num_ops else num_ops
    applied = []
    for _ in range(k):
        name = names[rng.integers(0, len(names))]
        op, sample = STRONG_POOL[name]
        mag = sample(rng)
        if name == "noise":
            x = op(x, mag, rng.normal(tuple(x.shape)))
        elif name == "slice_offset":
            planes = x.shape[0] if x.ndim == 3 else 1
            x = op(x, mag, torch.tensor([rng.uniform(-1.0, 1.0) for _ in range(planes)]))
        else:
            x = op(x, mag)
        applied.append((name, mag))
    x = x.reshape(shape).contiguous()
    return (x, applied) if return_ops else x
