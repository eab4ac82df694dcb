"""The classical baseline: what a physicist does by hand, no model.

1. Support: smooth the intensity strongly enough to average over the domains (``support_sigma``
   voxels in the plane, ``support_sigma_z`` along z, where the sample extends and its support
   changes slowly), threshold it with Otsu, close small gaps, fill holes slice by slice, open away
   specks and streaks, and keep the largest connected region of each z slice (dropping slices
   where it is much smaller than usual: above or below a finite sample).
2. Domains: smooth lightly (``domain_sigma``) to tame noise, threshold with Otsu computed only
   inside the support: below -> 1 (``domain_minus``), above -> 2 (``domain_plus``).

Masked reconstructions (the volume's support decision, ``magseg_hpc.volume.support``: the
outside one exact value at the minimum, the middle or anywhere, or NaN, or a mask file): the
support is the convex hull of each slice's pixels that are not the outside
(``support.plane_support``) instead of a threshold (a dark domain can be as dark as that
background), and the light smoothing averages over the support only (NaN pixels left out),
so the sample's edge is not pulled towards the outside's value.

Unmasked volumes: the outside is noise around a level ``outside_level`` (the median of the
field of view's border). ``support_feature="auto"`` (default) decides per volume between
``"intensity"`` (the sample is brighter than the outside: an intensity image) and
``"magnitude"`` (``|lightly smoothed intensity - outside_level|``: a signed magnetization
component, one domain orientation below the outside's level and the other above, a
three-level split), by where the sample's voxels lie: mostly above the outside's level, or
on both sides of it.

Labels follow ``ClassTable.default()``: 0 background, 1 domain_minus, 2 domain_plus.

Thresholds are fitted once on a sample of the whole volume (:func:`fit_threshold_params`)
and applied to every slab (:func:`apply_threshold`), so slabs agree with each other. Slab
edges: the Gaussians need :func:`threshold_halo` slices of context along z on each side; the
blockwise caller reads ``slab + halo`` and keeps the middle. Everything else works slice by
slice, so the result does not depend on where slabs are cut (up to that halo).

"""

from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np
from scipy import ndimage
from skimage.filters import threshold_otsu

from magseg_hpc.errors import MagsegError
from magseg_hpc.volume.support import describe as describe_support
from magseg_hpc.volume.support import (
    detect_support,
    is_masked,
    plane_support,
    sample_planes,
    support_of,
)

log = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_OPTIONS",
    "fit_threshold_params",
    "apply_threshold",
    "threshold_halo",
    "threshold_segment",
    "threshold_segment_volume",
]

DEFAULT_OPTIONS: dict[str, Any] = {
    "support_sigma": 4.0,  # voxels; about a domain period / 3, averages plus and minus domains
    # voxels along z (unmasked volumes): the samples (pillars, films) extend along z, so their
    # support changes slowly there and a longer average finds it through stronger noise
    "support_sigma_z": 12.0,
    "domain_sigma": 1.5,  # voxels; noise vs wall sharpness
    "support_feature": "auto",  # intensity, magnitude (signed images) or auto (module doc)
    "opening_radius": 2,  # voxels, in-plane disk; removes specks and thin streaks
    "closing_radius": 2,  # voxels, in-plane disk; bridges gaps before hole filling
    "min_area_fraction": 0.1,  # of the typical slice support area; smaller slices -> no support
}
FEATURES = ("auto", "intensity", "magnitude")
# The support's long z average stops at this many sigmas (95 % of its weight): a slab's
# context is then 24 slices each side, not 48.
Z_TRUNCATE = 2.0
# auto: an intensity image when fewer than this share of the sample lies below the outside
SIGNED_SHARE = 0.1
FORMAT = "magseg-hpc/threshold/2"  # 2: support_sigma_z

# Fitting reads at most this many slabs of this many slices, and keeps at most this many
# voxels per slab for the Otsu histograms (strided in y and x).
_FIT_SLABS = 6
_FIT_SLAB_DEPTH = 12
_FIT_VOXELS_PER_SLAB = 1_000_000


def _options(options: dict[str, Any] | None) -> dict[str, Any]:
    opts = dict(DEFAULT_OPTIONS)
    for key, value in (options or {}).items():
        if key not in DEFAULT_OPTIONS:
            raise MagsegError(
                f"unknown threshold option {key!r}; valid: "
                + ", ".join(f"{k} (default {v})" for k, v in DEFAULT_OPTIONS.items())
            )
        opts[key] = value
    if opts["support_feature"] not in FEATURES:
        raise MagsegError(
            f"support_feature must be one of {', '.join(FEATURES)}, got {opts['support_feature']!r}"
        )
    for key in ("support_sigma", "support_sigma_z", "domain_sigma", "opening_radius",
                "closing_radius"):
        if not (float(opts[key]) >= 0):
            raise MagsegError(f"threshold option {key} must be >= 0, got {opts[key]!r}")
    return opts


def threshold_halo(params: dict[str, Any]) -> int:
    """Slices of context along z each side of a slab so its smoothing matches the whole volume
    (a masked volume's support is read, not smoothed)."""
    reach = 4.0 * float(params["domain_sigma"])  # scipy's gaussian_filter truncates at 4 sigma
    if not is_masked(support_of(params)):
        reach = max(reach, 4.0 * float(params["support_sigma"]),
                    Z_TRUNCATE * float(params["support_sigma_z"]))
    return int(math.ceil(reach))


def _check_slab(slab: Any) -> np.ndarray:
    arr = np.asarray(slab)
    if arr.ndim != 3:
        raise MagsegError(f"threshold segmentation needs a (z, y, x) slab, got shape {arr.shape}")
    if arr.size == 0:
        raise MagsegError("threshold segmentation got an empty slab")
    arr = arr.astype(np.float32, copy=False)
    if not np.isfinite(arr).all():
        # NaNs from masked reconstructions: treat as background intensity.
        arr = np.nan_to_num(arr, nan=0.0, posinf=0.0, neginf=0.0)
    return arr


def _domain(slab: np.ndarray, opts: dict[str, Any]) -> np.ndarray:
    return ndimage.gaussian_filter(slab, float(opts["domain_sigma"]), mode="nearest")


def _support_feature(domain: np.ndarray, opts: dict[str, Any], feature: str,
                     level: float) -> np.ndarray:
    base = np.abs(domain - np.float32(level)) if feature == "magnitude" else domain
    in_plane = float(opts["support_sigma"])
    base = ndimage.gaussian_filter(base, (0.0, in_plane, in_plane), mode="nearest")
    if float(opts["support_sigma_z"]) == 0:
        return base
    return ndimage.gaussian_filter1d(base, float(opts["support_sigma_z"]), axis=0,
                                     mode="nearest", truncate=Z_TRUNCATE)


def _features(slab: np.ndarray, params: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """(support feature, domain feature), both float32 like the slab."""
    domain = _domain(slab, params)
    return _support_feature(domain, params, params["support_feature"],
                            params.get("outside_level", 0.0)), domain


def _disk(radius: int) -> np.ndarray:
    r = int(radius)
    yy, xx = np.mgrid[-r : r + 1, -r : r + 1]
    return (yy**2 + xx**2 <= r * r)[None]  # (1, k, k): in-plane only, slab-independent


def _clean_support(raw: np.ndarray, opts: dict[str, Any], min_area: float) -> np.ndarray:
    mask = raw
    if int(opts["closing_radius"]) > 0:
        # Pad so closing does not eat into a support that touches the slice border.
        r = int(opts["closing_radius"])
        padded = np.pad(mask, ((0, 0), (r, r), (r, r)), mode="edge")
        mask = ndimage.binary_closing(padded, _disk(r))[:, r:-r, r:-r]
    out = np.zeros_like(mask)
    for z in range(mask.shape[0]):
        sl = ndimage.binary_fill_holes(mask[z])
        if int(opts["opening_radius"]) > 0:
            sl = ndimage.binary_opening(sl, _disk(int(opts["opening_radius"]))[0])
        lab, n = ndimage.label(sl)
        if n == 0:
            continue
        sizes = np.bincount(lab.ravel())[1:]
        best = int(np.argmax(sizes))
        if sizes[best] >= min_area:
            out[z] = lab == best + 1
    return out


def _slab_starts(nz: int, n_slabs: int, depth: int) -> list[int]:
    if nz <= n_slabs * depth:
        return list(range(0, nz, depth))
    return sorted({int(round(s)) for s in np.linspace(0, nz - depth, n_slabs)})


def fit_threshold_params(volume_sample: Any, options: dict[str, Any] | None = None, *,
                         support: dict | None = None) -> dict:
    """Fit the global support and domain thresholds on a sample of the volume.

    ``volume_sample``: (z, y, x) numpy array, dask array or xr.DataArray (the whole volume is
    fine: only up to 6 evenly spaced slabs of 12 slices are read, and each slab's features are
    subsampled in y and x for the histograms). ``options``: see ``DEFAULT_OPTIONS``.
    ``support``: the volume's support decision (None: detected here).
    Returns a JSON-serialisable dict for :func:`apply_threshold`.
    """
    opts = _options(options)
    data = _array(volume_sample)
    if len(getattr(data, "shape", ())) != 3:
        raise MagsegError(
            f"threshold fitting needs a (z, y, x) volume, got shape {getattr(data, 'shape', None)}"
        )
    nz, ny, nx = data.shape
    stride = max(1, int(math.ceil(math.sqrt(_FIT_SLAB_DEPTH * ny * nx / _FIT_VOXELS_PER_SLAB))))
    support = detect_support(data) if support is None else support
    if is_masked(support):  # decided first: its features differ, none computed twice
        return _fit_masked(data, opts, stride, support)
    level = _outside_level(data)
    samples = {"intensity": [], "magnitude": [], "domain": []}
    for start in _slab_starts(nz, _FIT_SLABS, _FIT_SLAB_DEPTH):
        slab = _check_slab(np.asarray(data[start : start + _FIT_SLAB_DEPTH]))
        domain = _domain(slab, opts)
        samples["domain"].append(domain[:, ::stride, ::stride].ravel())
        for feature in ("intensity", "magnitude"):
            values = _support_feature(domain, opts, feature, level)
            samples[feature].append(values[:, ::stride, ::stride].ravel())
    domain_values = np.concatenate(samples["domain"])
    feature, support_values, support_threshold = _choose_feature(
        opts["support_feature"], {f: np.concatenate(samples[f]) for f in FEATURES[1:]},
        domain_values, level)
    inside = support_values > support_threshold
    if inside.sum() < 2 or domain_values[inside].min() == domain_values[inside].max():
        raise MagsegError(
            "threshold fitting found no sample support with contrast; check the volume, or "
            "pass --outside VALUE / --mask PATH if its outside is masked"
        )
    domain_threshold = float(threshold_otsu(domain_values[inside]))
    # Typical support area per slice in full-resolution voxels, for the min-area rule.
    per_slice = inside.reshape(-1, len(range(0, ny, stride)) * len(range(0, nx, stride)))
    typical_area = float(np.median(per_slice.sum(axis=1))) * stride * stride
    params = {
        "format": FORMAT,
        **opts,
        "support_feature": feature,
        "outside_level": level,
        "support_threshold": support_threshold,
        "domain_threshold": domain_threshold,
        "typical_support_area": typical_area,
        "fit_stride_yx": stride,
        "support": support,
    }
    log.info(
        "threshold baseline: not masked, support where the smoothed %s > %.4g (outside level "
        "%.4g), domains split at %.4g, support ~%d voxels/slice", feature, support_threshold,
        level, domain_threshold, typical_area,
    )
    return params


def _outside_level(data) -> float:
    """The unmasked outside's level: the median of the field of view's border."""
    planes = sample_planes(data).astype(np.float32)
    border = np.concatenate([planes[:, 0], planes[:, -1], planes[:, :, 0], planes[:, :, -1]],
                            axis=None)
    border = border[np.isfinite(border)]
    return float(np.median(border)) if border.size else 0.0


def _choose_feature(feature: str, values: dict[str, np.ndarray], domain: np.ndarray,
                    level: float) -> tuple[str, np.ndarray, float]:
    """(feature, its sampled values, its Otsu threshold): ``auto`` takes magnitude when
    the sample found by it lies on both sides of the outside's level (module docstring)."""
    for name in values:
        if values[name].min() == values[name].max():
            raise MagsegError("the volume is constant: there is nothing to threshold")
    if feature == "auto":
        magnitude = values["magnitude"] > threshold_otsu(values["magnitude"])
        below = np.mean(domain[magnitude] < level) if magnitude.any() else 0.0
        feature = "magnitude" if below >= SIGNED_SHARE else "intensity"
    return feature, values[feature], float(threshold_otsu(values[feature]))


def _array(volume: Any):
    """The (numpy or dask) array of a DataArray; numpy arrays as they are (their .data is a
    memoryview)."""
    return volume if isinstance(volume, np.ndarray) else getattr(volume, "data", volume)


def _masked_features(arr: np.ndarray, opts: dict[str, Any], support: dict):
    """(support, domain feature) of a raw masked slab: the smoothing is normalised over the
    support's pixels that hold a value (a dark domain clipped to the masked value does; NaN
    does not)."""
    hull = np.stack([plane_support(plane, support) for plane in arr])
    valid = hull & np.isfinite(arr) if arr.dtype.kind == "f" else hull
    sigma = float(opts["domain_sigma"])
    weight = ndimage.gaussian_filter(valid.astype(np.float32), sigma, mode="nearest")
    domain = ndimage.gaussian_filter(np.where(valid, arr, 0).astype(np.float32), sigma,
                                     mode="nearest") / np.maximum(weight, 1e-6)
    return hull, domain


def _fit_masked(data, opts: dict[str, Any], stride: int, support: dict) -> dict:
    values = []
    for start in _slab_starts(data.shape[0], _FIT_SLABS, _FIT_SLAB_DEPTH):
        slab = np.asarray(data[start : start + _FIT_SLAB_DEPTH]).astype(np.float32, copy=False)
        hull, domain = _masked_features(slab, opts, support)
        values.append(domain[:, ::stride, ::stride][hull[:, ::stride, ::stride]])
    inside = np.concatenate(values)
    if inside.size < 2 or inside.min() == inside.max():
        raise MagsegError("threshold fitting found no contrast inside the masked sample")
    params = {"format": FORMAT, **opts, "support_threshold": None,
              "domain_threshold": float(threshold_otsu(inside)), "typical_support_area": None,
              "fit_stride_yx": stride, "support": support}
    log.info("threshold baseline: %s, domains split at %.4g", describe_support(support),
             params["domain_threshold"])
    return params


def apply_threshold(slab: Any, params: dict[str, Any]) -> np.ndarray:
    """Label a (z, y, x) slab with fitted params: uint8, 0 background, 1 minus, 2 plus.

    Pure numpy/scipy kernel, safe to call from Dask workers. Give it ``threshold_halo(params)``
    extra slices each side along z and crop them afterwards for seamless slabs.
    """
    if params.get("format") != FORMAT:
        raise MagsegError(
            f"threshold params have format {params.get('format')!r}, expected {FORMAT!r}; "
            "create them with fit_threshold_params"
        )
    opts = _options({k: params[k] for k in DEFAULT_OPTIONS})
    if is_masked(support_of(params)):
        arr = np.asarray(slab).astype(np.float32, copy=False)
        support, domain = _masked_features(arr, opts, support_of(params))
        labels = np.zeros(arr.shape, dtype=np.uint8)
        labels[support] = np.where(domain[support] > params["domain_threshold"], 2, 1)
        return labels
    arr = _check_slab(slab)
    support_feature, domain = _features(arr, {**params, **opts})
    min_area = float(opts["min_area_fraction"]) * float(params["typical_support_area"])
    support = _clean_support(support_feature > params["support_threshold"], opts, min_area)
    labels = np.zeros(arr.shape, dtype=np.uint8)
    labels[support] = np.where(domain[support] > params["domain_threshold"], 2, 1)
    return labels


def threshold_segment(slab: Any, options: dict[str, Any] | None = None) -> np.ndarray:
    """Fit on this slab alone and label it (a first look; volumes: fit once, apply per slab)."""
    return apply_threshold(slab, fit_threshold_params(slab, options))


def threshold_segment_volume(
    volume: Any,
    options: dict[str, Any] | None = None,
    *,
    params: dict[str, Any] | None = None,
    slab_depth: int = 32,
) -> np.ndarray:
    """Label a whole (small) volume: fit globally, then apply slab by slab with a z halo.

    ``volume``: xr.DataArray (dims z, y, x), dask or numpy array. Returns uint8 labels in
    memory, so the labels (not the image) must fit in memory.
    """
    data = _array(volume)
    if params is None:
        params = fit_threshold_params(data, options)
    nz = data.shape[0]
    halo = threshold_halo(params)
    out = np.empty(data.shape, dtype=np.uint8)
    for start in range(0, nz, slab_depth):
        stop = min(nz, start + slab_depth)
        lo, hi = max(0, start - halo), min(nz, stop + halo)
        labels = apply_threshold(np.asarray(data[lo:hi]), params)
        out[start:stop] = labels[start - lo : start - lo + (stop - start)]
    return out
