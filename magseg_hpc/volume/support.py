"""The sample's support: which voxels are outside the sample, decided once per volume.

Reconstructions reach us in several encodings of the same thing:

- a constant outside: every voxel outside the sample is one exact value, at the *minimum*
  (an 8-bit export masked to 0), the *middle* (a signed magnetization component whose
  outside carries no signal, 0.0) or anywhere else (a scaled and offset copy);
- NaN outside (a float reconstruction masked with NaN); a separate mask file is folded into
  this encoding when the volume is opened (:func:`open_input`);
- none: unmasked, the outside is noise (the support is then estimated by the baseline and
  learned from labels by a model).

The decision is a small dict, ``{"outside": "value", "value": v}``, ``{"outside": "nan"}``
or ``{"outside": "none"}``, plus ``"source"`` (detected, option, stored, a mask file). It is
made once (:func:`resolve_support`: an explicit option, else the decision stored in the
volume by ``ingest``, else :func:`detect_support`) and then travels in the normalisation
and the baseline's parameters, so every consumer (normalisation, the model input's
``mark_outside``, the masked-support rule, the baseline, ``model.norm: auto``,
export-slices, the fusion check) reads the same one.

Detection: NaN, or one of the minimum, the maximum, 0.0 and the most common value, is the
outside when it holds at least ``MASKED_FRACTION`` of the sampled voxels and most
(``BORDER_FRACTION``) of the field of view's border, or a little (1 %) and nearly all (90 %)
of the border: a sample sits inside its field of view, and a saturated or quantised grey
level that is merely common does not line the border. NaN wins over any value. A constant
only beyond the reconstruction's field of view (the circle of a filtered back-projection:
the rest spans the planes) is not the sample's outside: such a volume is unmasked.

Each plane's support is the convex hull of its pixels that are not the outside encoding
(:func:`plane_support`): dark domains are often clipped to the masked value itself, and
where one touches the sample's edge nothing in the intensity shows where the sample ends.
A mask file is the support itself (``"exact": True``): no hull.
"""

from __future__ import annotations

import math
import os

import numpy as np

from magseg_hpc.errors import MagsegError

# A single value this common (share of the sampled voxels) may be a masked outside.
MASKED_FRACTION = 0.15
# ... if it also holds this share of the field of view's border pixels.
BORDER_FRACTION = 0.5
# Detection reads at most this many evenly spread z planes and this many values.
_PLANES = 16
_VALUES = 1 << 22
_MODE_VALUES = 200_000
NONE = {"outside": "none"}
OPTION_HELP = ("auto (detect it; default), none (unmasked), nan, or the outside's exact value "
               "(e.g. 0)")


def support_of(params: dict | None) -> dict:
    """The support decision a normalisation or baseline carries (``NONE`` when it has none;
    checkpoints written before supports were decided carry ``masked_value``)."""
    params = params or {}
    if params.get("support"):
        return params["support"]
    if params.get("masked_value") is not None:
        return {"outside": "value", "value": float(params["masked_value"]), "source": "detected"}
    return NONE


def is_masked(support: dict) -> bool:
    return support.get("outside", "none") != "none"


def describe(support: dict) -> str:
    """One phrase for logs, ``info`` and error lines."""
    kind = support.get("outside", "none")
    what = {"value": f"outside masked at exactly {support.get('value', 0):g}",
            "nan": "outside masked with NaN",
            "none": "not masked (outside is noise)"}[kind]
    return f"{what} ({support['source']})" if support.get("source") else what


def parse_outside(text: str | float | None) -> dict | None:
    """An explicit support from ``--outside`` / ``data.outside``; None for auto."""
    if text is None or str(text).strip().lower() == "auto":
        return None
    word = str(text).strip().lower()
    if word in ("none", "nan"):
        return {"outside": word, "source": "option"}
    try:
        value = float(word)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise MagsegError(f"--outside {text}: choose {OPTION_HELP}")
    return {"outside": "value", "value": value, "source": "option"}


def inside_pixels(x: np.ndarray, support: dict) -> np.ndarray:
    """Pixels that are not the outside encoding (all of them on an unmasked volume)."""
    x = np.asarray(x)
    kind = support.get("outside", "none")
    if kind == "value":
        return x != x.dtype.type(support["value"]) if x.dtype.kind == "f" else \
            x != support["value"]
    if kind == "nan":
        return ~np.isnan(x) if x.dtype.kind == "f" else np.ones(x.shape, bool)
    return np.ones(x.shape, bool)


def plane_support(plane: np.ndarray, support: dict) -> np.ndarray:
    """One plane's sample support: the convex hull of its pixels that are not the outside
    encoding (module docstring). The samples of magnetic nanotomography are pillars,
    cylinders and slabs, whose cross-sections are convex in any plane; a concave one would
    have its concavities counted as sample."""
    from skimage.morphology import convex_hull_image

    inside = inside_pixels(plane, support)
    if not inside.any() or not is_masked(support) or support.get("exact"):
        return inside
    # the hull of the sample's bounding box: a small sample in a large field of view costs
    # its own size, not the slice's
    rows, cols = np.flatnonzero(inside.any(axis=1)), np.flatnonzero(inside.any(axis=0))
    box = (slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))
    hull = np.zeros_like(inside)
    hull[box] = convex_hull_image(inside[box]) | inside[box]
    return hull


def outside_planes(planes: np.ndarray, support: dict) -> np.ndarray:
    """Pixels outside the sample support of each 2D plane of ``planes`` (..., H, W)."""
    planes = np.asarray(planes)
    flat = planes.reshape(-1, *planes.shape[-2:])
    return ~np.stack([plane_support(p, support) for p in flat]).reshape(planes.shape)


def planes_with_sample(planes: np.ndarray, support: dict) -> np.ndarray:
    """(B,) bool for planes (B, ..., H, W): which hold any pixel that is not the outside."""
    if not is_masked(support):
        return np.ones(len(planes), bool)
    return inside_pixels(planes, support).reshape(len(planes), -1).any(axis=1)


def sample_planes(volume) -> np.ndarray:
    """Up to ``_PLANES`` evenly spread planes of a 2D, 3D or stacked (..., H, W) array
    (numpy, dask or xarray), strided in-plane to at most ``_VALUES`` values in all."""
    data = volume if isinstance(volume, np.ndarray) else getattr(volume, "data", volume)
    if not hasattr(data, "shape"):
        data = np.asarray(data)
    if data.ndim == 1:  # values without a plane: every one counts as border
        data = data[None, None]
    elif data.ndim == 2:
        data = data[None]
    elif data.ndim > 3:
        data = data.reshape(-1, *data.shape[-2:])
    n, h, w = data.shape
    idx = np.unique(np.linspace(0, n - 1, min(n, _PLANES)).astype(int))
    stride = max(1, math.ceil(math.sqrt(len(idx) * h * w / _VALUES)))
    planes = data[idx][:, ::stride, ::stride]
    if not hasattr(planes, "compute"):
        return np.asarray(planes)
    from magseg_hpc.volume.io import reading  # at call time: io is the lower layer

    # a damaged chunk is one line naming the volume, whichever command samples it first
    with reading(getattr(volume, "attrs", {}).get("source", "the volume")):
        return np.asarray(planes.compute())


def _border(planes: np.ndarray) -> np.ndarray:
    return np.concatenate([planes[:, 0], planes[:, -1], planes[:, 1:-1, 0],
                           planes[:, 1:-1, -1]], axis=None)


def detect_support(volume) -> dict:
    """The outside encoding of ``volume`` (module docstring), from a sample of its planes."""
    planes = sample_planes(volume)
    candidates = []
    if planes.dtype.kind == "f" and np.isnan(planes).any():
        candidates.append({"outside": "nan"})
    values = planes[np.isfinite(planes)] if planes.dtype.kind == "f" else planes.ravel()
    if values.size:
        step = max(1, values.size // _MODE_VALUES)
        uniq, counts = np.unique(values[::step], return_counts=True)
        candidates += [{"outside": "value", "value": float(v)} for v in sorted(
            {values.min(), values.max(), values.dtype.type(0), uniq[np.argmax(counts)]})]
    found = []
    for support in candidates:  # NaN first: a NaN outside wins over any value
        outside = ~inside_pixels(planes, support)
        share, border = outside.mean(), _border(outside).mean()
        if share < 1 and ((share >= MASKED_FRACTION and border >= BORDER_FRACTION)
                          or (share >= 0.01 and border >= 0.9)):
            found.append((2.0 if support["outside"] == "nan" else share, support))
    if not found:
        return {**NONE, "source": "detected"}
    return _unless_field_of_view(planes, max(found, key=lambda f: f[0])[1])


def _unless_field_of_view(planes: np.ndarray, support: dict) -> dict:
    """A reconstruction zeroed outside its field of view (the circle of a filtered
    back-projection) has a constant outside that is not the sample's: the rest spans the
    planes and holds most of them, the sample's outside inside it being noise."""
    inside = inside_pixels(planes, support)
    rows, cols = inside.any(axis=2), inside.any(axis=1)
    spans = (rows.sum(axis=1) >= 0.95 * inside.shape[1]) & (cols.sum(axis=1)
                                                             >= 0.95 * inside.shape[2])
    if np.mean(spans) >= 0.5 and inside.mean() >= 0.6:
        return {**NONE, "source": f"detected; {describe(support)} only beyond the "
                "reconstruction's field of view"}
    return {**support, "source": "detected"}


def display_window(values: np.ndarray, support: dict,
                   percentiles=(1.0, 99.5)) -> tuple[float, float, bool]:
    """(low, high, signed): the grey window of pictures of a sample: percentiles of its
    finite values, the outside left out; signed data (values on both sides of 0) get a window
    symmetric about 0, so zero magnetization is mid grey and both orientations as far from
    it. Raises MagsegError when nothing of the sample is left."""
    values = np.asarray(values)
    values = values[np.isfinite(values) & inside_pixels(values, support)]
    if values.size == 0:
        raise MagsegError("no finite intensities inside the sample to window")
    lo, hi = (float(v) for v in np.percentile(values, percentiles))
    signed = lo < 0 < hi
    if signed:
        lo, hi = -max(-lo, hi), max(-lo, hi)
    return lo, (hi if hi > lo else lo + 1.0), signed


STORED_ATTR = "magseg_support"


def resolve_support(volume, outside: str | float | None = None, *,
                    mask: str | os.PathLike | None = None) -> dict:
    """The one support decision for ``volume`` (module docstring): ``outside`` (an option:
    auto/None, none, nan or a value), a mask file (``open_input`` folded it in as NaN), the
    decision ``ingest`` stored in the volume, else detection."""
    chosen = parse_outside(outside)
    if chosen is not None:
        if mask is not None:
            raise MagsegError("--mask and --outside both say where the outside is; pass one")
        return chosen
    if mask is not None:
        return {"outside": "nan", "exact": True, "source": f"mask {mask}"}
    stored = (getattr(volume, "attrs", None) or {}).get(STORED_ATTR)
    if isinstance(stored, dict) and stored.get("outside") in ("value", "nan", "none"):
        return {**stored, "source": "stored"}
    return detect_support(volume)


def open_input(path, var: str | None = None, mask: str | os.PathLike | None = None):
    """``open_volume(path, var)``; with a mask file (any format ``open_volume`` reads, the
    same shape, non-zero inside the sample) the outside becomes NaN, lazily (float32)."""
    from magseg_hpc.volume.io import open_volume

    volume = open_volume(path, var)
    if mask is None:
        return volume
    support = open_volume(mask)
    if tuple(support.shape) != tuple(volume.shape):
        raise MagsegError(
            f"--mask {mask}: shape {'x'.join(map(str, support.shape))} differs from the "
            f"volume's {'x'.join(map(str, volume.shape))}; pass the mask of this volume")
    import dask.array as da

    data = volume.data.astype(np.float32)
    out = volume.copy(data=da.where(support.data != 0, data, np.float32(np.nan)))
    out.attrs = {k: v for k, v in volume.attrs.items() if k != STORED_ATTR}
    return out
