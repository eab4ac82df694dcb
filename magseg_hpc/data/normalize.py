"""Intensity normalisation: percentile clip to [0, 1], then standardise.

The study min-max stretched each image separately; here one set of numbers is fitted per
training volume and stored in the checkpoint, so inference on any slab scales identically:

    x01 = clip((x - low) / (high - low), 0, 1)       # low/high: 0.5th/99.5th percentiles
    x   = (x01 - mean) / std                         # mean/std of x01 over the sample

Augmentations run on ``x01`` (``scale_to_unit``) and ``standardize`` follows them;
``apply_normalization`` does both at once (inference).

Dark is not outside: on a masked reconstruction the dark domain orientation is often clipped
to the masked value itself (on the study's published sweep, 38 % of the sample's pixels are
exactly 0), so within a crop the intensity alone cannot tell a dark domain from the outside,
and a model trained on crops flips between the two readings. With ``mark_outside`` (stored
in the normalisation, so training, validation, the fusion check and segment-volume encode
the input the same way) every pixel outside its plane's sample support
(``volume.support.plane_support``) gets ``OUTSIDE_X01``, a value below any sample value,
before standardising: the geometry that tells the two apart is then in the input itself.

Statistics come from the sample, not the outside: a published reconstruction is often
masked (every voxel outside the sample one exact value or NaN, 90 % of a large field of
view). The volume's support decision (``magseg_hpc.volume.support``: a constant outside at
any value, NaN, or none) is made once, carried in the normalisation as ``support``, and the
outside is left out of the percentiles, mean and std, so the numbers describe the sample
whatever the field of view and however the outside is encoded: the same sample as 8-bit
masked at 0, signed float with a 0.0 outside, NaN outside, or scaled and offset gives the
same model input. NaN pixels inside a plane's support are given the middle of the range.
A clip level is left out too: an extreme value that holds 1 % of the sample and ten times
the voxels of the value next to it (the published sweep's 8-bit export put its darkest 38 %
at the masked 0; a float copy holds them at one value inside the sample), so the export and
its float copy get the same statistics and the clipped voxels scale to 0 (or 1) in both.

Large inputs (dask arrays, xarray DataArrays or numpy arrays over ``max_samples`` elements)
are subsampled with a regular stride along every axis before the percentiles are computed,
so fitting a terabyte volume reads a bounded, evenly spread sample; for smaller inputs the
result is exact.
"""

from __future__ import annotations

import math

import numpy as np

from magseg_hpc.errors import MagsegError
from magseg_hpc.volume.support import detect_support, is_masked, outside_planes, support_of

DEFAULT_MAX_SAMPLES = 1 << 24  # about 16 M values
# Model input outside a masked sample, in the [0, 1] scale (module docstring)
OUTSIDE_X01 = -1.0
# The scaled sample's deciles, stored to compare an input with the training volume
DECILES = tuple(range(10, 100, 10))
# A decile shift above which the input is not like the training volume: 0.02-0.05 between
# seeds, halves of a volume and SNR 1-4 of one preset; 0.30 for the published 8-bit sweep
# against its signed-float copies with noise and streaks added (benchmarks/README.md)
SHIFT_WARNING = 0.15
# What a refit on another volume keeps from the trained normalisation: how the input is encoded
ENCODING_KEYS = ("mark_outside",)


def _strided_sample(values, max_samples: int) -> np.ndarray:
    """A flat sample this function owns (the caller's array is never modified): float32 for
    data of float32 precision or less, float64 otherwise (its range is checked later)."""
    # xarray -> its (dask or numpy) array; a numpy array's own .data is a raw memoryview
    data = values if isinstance(values, np.ndarray) else getattr(values, "data", values)
    if not hasattr(data, "shape"):
        data = np.asarray(data)
    size = math.prod(data.shape)
    if size > max_samples:
        # the same stride on every axis keeps the sample evenly spread
        step = math.ceil((size / max_samples) ** (1.0 / max(data.ndim, 1)))
        data = data[(slice(None, None, step),) * data.ndim]
    source = np.dtype(data.dtype)
    dtype = np.float32 if source.itemsize <= 4 and source.kind in "fiub" else np.float64
    if hasattr(data, "store"):  # dask: chunk by chunk into one array, no concatenated copy
        out = np.empty(data.shape, dtype)
        data.astype(dtype).store(out, lock=False)
        return out.ravel()
    return np.array(data, dtype=dtype).ravel()  # a copy: the sample is changed in place


def _mean_std(x: np.ndarray, block: int = 1 << 20) -> tuple[float, float]:
    """Mean and standard deviation accumulated in float64 over blocks: no full-size
    temporary (the sample can be 16 M values)."""
    total = squares = 0.0
    for i in range(0, x.size, block):
        b = x[i:i + block].astype(np.float64)
        total += float(b.sum())
        squares += float(b @ b)
    mean = total / x.size
    return mean, math.sqrt(max(squares / x.size - mean * mean, 0.0))


# A clip level (module docstring): an extreme value holding CLIP_SHARE of the sample and
# CLIP_PEAK times the voxels of the value next to it; data of a few grey levels has none
CLIP_SHARE, CLIP_PEAK = 0.01, 10


def _without_clipped_ends(sample: np.ndarray) -> np.ndarray:
    """``sample`` without its clip levels, if at least half of it and some spread remain: so
    the 8-bit export whose dark domains were clipped into the masked minimum and its float
    original, whose clipped voxels sit at one value inside the sample, get the same
    statistics (the clipped voxels scale to 0 or 1 in both)."""
    rest = sample
    for pick in (np.min, np.max):
        at_end = rest == pick(rest)
        inner = rest[~at_end]
        count = int(at_end.sum())
        if (inner.size and count >= CLIP_SHARE * sample.size
                and count >= CLIP_PEAK * int((inner == pick(inner)).sum())):
            rest = inner
    if rest.size < 0.5 * sample.size or not rest.max() > rest.min():
        return sample
    return rest


def fit_normalization(
    values, low_pct: float = 0.5, high_pct: float = 99.5, max_samples: int = DEFAULT_MAX_SAMPLES,
    support: dict | None = None,
) -> dict:
    """Fit {"low", "high", "mean", "std"} (plain floats) and "support" on a volume, slab or
    sample.

    ``values``: numpy array, dask array or xarray DataArray of any shape. ``support``: the
    volume's support decision (None: detected here); its outside is left out. Non-finite
    values are ignored. Raises MagsegError when the sample is empty or has no intensity spread.
    The sample is filtered, partitioned and scaled in place, so the memory it takes does not
    multiply with the sample's size (segment-volume's client fits it on every input).
    """
    if not 0 <= low_pct < high_pct <= 100:
        raise MagsegError(
            f"normalisation percentiles must satisfy 0 <= low < high <= 100, "
            f"got low={low_pct}, high={high_pct}"
        )
    if support is None:
        support = detect_support(values)
    sample = _strided_sample(values, max_samples)
    finite = np.isfinite(sample)
    if not finite.all():
        sample = sample[finite]
    del finite
    if sample.size == 0:
        raise MagsegError(
            "no finite intensity values to fit the normalisation on; "
            "check the volume (all NaN or empty?)"
        )
    if support.get("outside") == "value":
        sample = sample[sample != sample.dtype.type(support["value"])]
    if sample.size == 0:
        raise MagsegError("every voxel is the masked outside; check the volume or --outside")
    sample = _without_clipped_ends(sample)
    low, high = (float(v) for v in np.percentile(sample, [low_pct, high_pct],
                                                   overwrite_input=True))
    if not high > low:
        raise MagsegError(
            f"intensity percentiles {low_pct}/{high_pct} are both {low:g} (a constant "
            "volume?); check the input or widen the percentiles"
        )
    with np.errstate(over="ignore", invalid="ignore"):
        low32, high32 = np.float32(low), np.float32(high)
        span32 = high32 - low32
    if not (np.isfinite(low32) and np.isfinite(high32) and np.isfinite(span32) and span32 > 0):
        # the model computes in float32 (or bf16, float32's range): numbers it cannot subtract
        raise MagsegError(
            f"intensity percentiles {low_pct}/{high_pct} are {low:g} and {high:g}: beyond "
            "float32 arithmetic, which the model computes in; rescale the volume (e.g. to "
            "physical units of order 1) and try again"
        )
    with np.errstate(over="ignore"):
        sample -= sample.dtype.type(low)
        sample /= sample.dtype.type(high - low)
    np.clip(sample, 0.0, 1.0, out=sample)
    mean, std = _mean_std(sample)
    deciles = np.percentile(sample, DECILES, overwrite_input=True)
    return {
        "low": low,
        "high": high,
        "mean": mean,
        "std": max(std, 1e-6),
        "deciles": [round(float(d), 4) for d in deciles],
        "support": support,
    }


def intensity_shift(trained: dict, fitted: dict) -> float | None:
    """How far an input's scaled intensities lie from the training volume's: the largest
    difference of their deciles in [0, 1] (None where a normalisation predates deciles).
    Both are scaled by their own percentiles, so a gain or an offset moves nothing; what
    moves them is a different distribution inside the sample (another encoding that clips
    or folds the dark domains into the outside, another contrast)."""
    if "deciles" not in trained or "deciles" not in fitted:
        return None
    return float(np.abs(np.subtract(trained["deciles"], fitted["deciles"])).max())


def _check(norm: dict) -> None:
    missing = [k for k in ("low", "high", "mean", "std") if k not in norm]
    if missing:
        raise MagsegError(f"normalisation {norm!r} lacks {missing}; refit it")


def scale_to_unit(x, norm: dict):
    """Percentile step only: clip((x - low) / (high - low), 0, 1) as float32, NaN (a
    NaN-masked outside) at 0.5. numpy in, numpy out; torch in, torch out."""
    _check(norm)
    span = norm["high"] - norm["low"]
    if hasattr(x, "clamp"):  # torch tensor
        return ((x.float() - norm["low"]) / span).clamp_(0.0, 1.0).nan_to_num_(0.5)
    with np.errstate(over="ignore", invalid="ignore"):  # +-inf outliers clip to 0/1
        x01 = np.clip(
            (np.asarray(x, dtype=np.float32) - np.float32(norm["low"])) / np.float32(span),
            0.0, 1.0).astype(np.float32, copy=False)
    return np.nan_to_num(x01, copy=False, nan=0.5)


def standardize(x01, norm: dict):
    """(x01 - mean) / std, for values already scaled to [0, 1]; numpy or torch."""
    _check(norm)
    if hasattr(x01, "clamp"):
        return (x01.float() - norm["mean"]) / norm["std"]
    return (
        (np.asarray(x01, dtype=np.float32) - np.float32(norm["mean"])) / np.float32(norm["std"])
    ).astype(np.float32, copy=False)


def refit_normalization(values, trained: dict, **kw) -> dict:
    """``fit_normalization`` on ``values`` (``kw``: its support too) that keeps the input
    encoding a model was trained with (``ENCODING_KEYS``): segment-volume's and the fusion
    check's default."""
    return {**fit_normalization(values, **kw),
            **{k: trained[k] for k in ENCODING_KEYS if k in trained}}


def marks_outside(norm: dict) -> bool:
    """Whether the model input marks the outside of a masked sample (module docstring)."""
    return bool(norm.get("mark_outside")) and is_masked(support_of(norm))


def mark_outside(x01: np.ndarray, outside: np.ndarray) -> np.ndarray:
    """``x01`` with ``OUTSIDE_X01`` where ``outside`` (same shape), float32."""
    return np.where(outside, np.float32(OUTSIDE_X01), x01).astype(np.float32, copy=False)


def apply_normalization(x, norm: dict, outside: np.ndarray | None = None):
    """The model input for raw intensities ``x``: standardize(scale_to_unit(x)), float32,
    the outside of a masked sample marked when the normalisation says so (``outside``: the
    caller's ``outside_planes(x)``, else computed here)."""
    x01 = scale_to_unit(x, norm)
    if marks_outside(norm):
        if outside is None:
            outside = outside_planes(x, support_of(norm))
        x01 = mark_outside(x01, outside)
    return standardize(x01, norm)
