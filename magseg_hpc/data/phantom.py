"""Synthetic magnetization-tomography phantoms with exact ground truth.

The phantom imitates a reconstructed magnetization component from X-ray magnetic
(ptycho-)tomography of a micro-pillar or film: magnetic domains (labyrinth or stripes)
separated by walls of finite width, inside a sample support, seen through the imperfections
of a limited-angle tomographic reconstruction (blur, streaks, missing wedge, edge glow) and
noise. Labels are the truth before any of those imperfections: 0 outside the support,
1 (``domain_minus``) and 2 (``domain_plus``) by the sign of the magnetization component.

Image formation, in order:

1. support ``S`` (pillar, cylinder or slab; optionally tilted about the x axis);
2. domain field ``f``: white noise band-passed (FFT) around ``1/domain_period``; isotropic in
   the plane for ``labyrinth``, concentrated around one in-plane wave vector for ``stripes``;
   stretched by ``anisotropy`` along z; optionally swirled around a few vortex-like centres;
   thresholded at the in-support quantile that gives the requested ``net_magnetization``;
3. magnetization ``m = tanh(f / w)`` with ``w`` chosen so walls are ``wall_width`` voxels wide;
4. intensity ``I = S * (minus_level + (1 - minus_level) * (m + 1) / 2)`` (negative domains
   dark but not zero, outside zero), plus ``edge_glow`` times a bright rim at the boundary;
5. Gaussian blur (``blur_sigma``), then per z slice a Radon projection over
   ``180 - missing_wedge_deg`` degrees with ``n_angles`` angles and filtered back-projection
   (streaks and missing-wedge smearing);
6. low-frequency shading of strength ``shading`` (see below), which a single global
   threshold cannot absorb but local context can;
7. Gaussian noise (slightly correlated, like reconstruction noise) scaled to ``snr``.

The result is then written in one ``encoding``: ``intensity`` (the image above, masked and
quantised as ``mask_margin`` and ``bit_depth`` say), ``uint8-masked`` (8-bit and masked as the
``sweep`` preset), or signed, ``(r - mid * D) / contrast`` with ``r`` the image above, ``D``
the support dilated by the mask margin, ``mid`` the midpoint of the two class means: minus
domains negative, plus positive, zero magnetisation at 0, and outside ``D`` 0 (``signed``),
NaN (``signed-nan``) or, unmasked, noise around 0 (there the midpoint is taken off as the
support is seen through the blur and the reconstruction, not as ``D``). Every encoding of one
seed is the same sample, noise included: inside ``D`` the masked ones are affine maps of each
other (uint8 quantised and clipped). The encoding decides the dtype: a preset's
``bit_depth`` is ignored by the signed three.

Shading imitates the slowly varying intensity errors of real reconstructions, in units of the
domain contrast ``c`` (mean plus minus mean minus of the unshaded image), with ``s = shading``:

- radial cupping in every slice (beam hardening and the missing low frequencies of a limited
  angular range): the intensity is multiplied by ``1 - s (1 - rho^2)`` for ``rho < 1``, where
  ``rho`` is the in-plane distance from the rotation axis over the half width of the slice, so
  the centre of the sample is darker than its rim by a fraction ``s``;
- a smooth 3D drift (beam decay, sample heating, thickness variation across the field of
  view): a multiplicative gain ``1 + (s / 2) g`` with ``g`` a random field of the three lowest
  spatial frequencies, scaled to ``max |g| = 1``;
- per-slice offsets (projection normalisation / flat-field errors that differ between detector
  rows): each z slice gets ``+ (s / 3) c n_z`` with ``n_z`` standard normal.

The default ``shading = 0.3`` is a moderate, realistic level: an uncorrected cupping of 10 to
30 % is typical of absorption CT with a polychromatic or drifting beam, and the magnetic
(dichroic) contrast of magnetic tomography is a small difference signal on top of that
absorption background, so residual low-frequency errors of a few tens of percent of the
domain contrast survive standard normalisation. ``shading = 0`` gives the ideal
reconstruction.

Randomness comes from independent child streams of ``numpy.random.SeedSequence(seed)``, so
the same seed gives bit-identical output, and changing ``snr`` changes only the noise
(the shading depends on the seed only, and the SNR is measured on the shaded image).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from magseg_hpc.classes import ClassTable
from magseg_hpc.data.tomography import (
    acquire,
    limited_angle_reconstruction,
    noise_std_for,
    reconstruction_noise,
    ring_pattern,
    shade,
)
from magseg_hpc.errors import MagsegError
from magseg_hpc.volume.store import write_image_store

log = logging.getLogger(__name__)

SUPPORTS = ("pillar", "cylinder", "slab")
ACQUISITIONS = ("image", "projections")
PATTERNS = ("labyrinth", "stripes")
# The same sample in each encoding physicists get reconstructions in (PARAMETERS["encoding"]).
ENCODINGS = ("intensity", "uint8-masked", "signed", "signed-nan", "unmasked")


# Defaults of make_phantom, also used by the CLI so both document the same numbers.
# Every parameter of make_phantom: its default and its meaning (the CLI's flags and help too).
PARAMETERS: dict[str, tuple[Any, str]] = {
    "shape": ((64, 128, 128), "volume shape Z,Y,X; each at least 4"),
    "snr": (2.0, "(mean of the noise-free image over domain_plus - over domain_minus) / noise "
            "std, > 0; inf adds no noise"),
    "seed": (0, "random seed; the same seed and parameters give a bit-identical phantom"),
    "support": ("pillar", "sample shape: pillar (a vertical cylinder through all z), cylinder "
                "(finite, flat caps) or slab (a film, normal along y)"),
    "tilt_deg": (4.0, "tilt of the support (and of the domains' anisotropy axis) about x, "
                 "degrees"),
    "domain_period": (14.0, "typical period of the domain pattern (one plus and one minus "
                      "domain) in voxels"),
    "pattern": ("labyrinth", "domain pattern: labyrinth (isotropic in the plane) or stripes"),
    "anisotropy": (2.0, ">= 1: domains this many times longer along the (tilted) z axis"),
    "wall_width": (2.0, "domain wall width in voxels (tanh profile)"),
    "blur_sigma": (1.0, "resolution blur (Gaussian sigma) in voxels, 0 off"),
    "n_angles": (60, "projection angles per slice of the tomography, 0 for no tomography "
                 "artifacts"),
    "missing_wedge_deg": (30.0, "angular range missing from the 180 degree tilt series"),
    "edge_glow": (0.4, "brightness of the rim at the sample boundary, relative to the bright "
                  "domain"),
    "swirl": (0.0, "strength of vortex-like swirls (rotation in radians at a swirl centre), "
              "0 off"),
    "net_magnetization": (0.0, "in (-1, 1): plus fraction minus minus fraction of the sample "
                          "(0: equal classes)"),
    "minus_level": (0.3, "brightness of minus domains relative to plus, in [0, 1)"),
    "noise_correlation": (0.5, "Gaussian sigma (voxels) correlating the noise, 0 white"),
    "shading": (0.3, "low-frequency intensity errors (radial cupping, smooth 3D drift, "
                "per-slice offsets) relative to the domain contrast, in [0, 0.9], 0 off"),
    "support_radius": (0.38, "pillar/cylinder radius (the ellipse's short semi-axis) / the "
                       "smaller in-plane side"),
    "ellipticity": (1.0, ">= 1: the support's cross-section this many times longer along x "
                    "than along y (a tilted pillar seen in a slice)"),
    "elongation": (1.0, ">= 1: domains this many times longer along the in-plane direction "
                   "at elongation_deg"),
    "elongation_deg": (0.0, "direction of the in-plane elongation, degrees from x"),
    "rings": (0.0, "ring-artifact amplitude (concentric rings about the rotation axis, "
              "constant along z) relative to the domain contrast, 0 off"),
    "mask_margin": (-1, "mask the reconstruction: exactly 0 beyond this many voxels outside "
                    "the sample (as published reconstructions are); -1 keeps its background"),
    "bit_depth": (0, "0: float32 image; 8: uint8 with the noise-free minus and plus domain "
                  "means at dark_level and bright_level (below 0 clips to 0)"),
    "encoding": ("intensity", "the same sample as: intensity (masked and quantised as "
                 "mask_margin and bit_depth say); uint8-masked (as bit_depth 8 with mask_margin, "
                 "2 if -1); signed (float32 in units of the domain contrast: minus domains "
                 "negative, plus positive, exactly 0 beyond mask_margin voxels outside the "
                 "sample, 2 if -1); signed-nan (signed, NaN there); unmasked (signed, no mask: "
                 "noise and streaks around 0 outside). The signed three ignore bit_depth"),
    "dark_level": (9.0, "8-bit grey level of the minus domains"),
    "bright_level": (120.0, "8-bit grey level of the plus domains"),
    "acquisition": ("image", "image: artefacts painted on the reconstruction; projections: "
                    "the tilt series simulated (photon noise set by snr, detector offsets, "
                    "drift) and reconstructed by FBP, without rings, shading or "
                    "noise_correlation"),
    "detector_offsets": (0.0, "projections only: per-detector-pixel offsets (rings), as the "
                         "rings' std in the sample over the domain contrast"),
    "z_drift": (0.0, "projections only: peak relative gain drift along z (slow, random)"),
}
DEFAULTS: dict[str, Any] = {name: default for name, (default, _) in PARAMETERS.items()}

# Named parameter sets; explicit arguments override a preset's values.
PRESETS: dict[str, dict[str, Any]] = {
    # A whole pillar in a tight field of view, float intensities: the original phantom.
    "default": {},
    # A tilted elliptic pillar with domains elongated in the plane, streaks and rings: the
    # kind of volume an independent generator makes, held out from a model's training.
    "elongated": {
        "tilt_deg": 10.0,
        "ellipticity": 1.3,
        "elongation": 2.5,
        "elongation_deg": 30.0,
        "rings": 0.3,
    },
    # Like the study's published 8-bit sweep (benchmarks/README.md, "Real data"): a tilted
    # elliptic pillar filling ~12 % of a large field of view, exactly 0 outside the masked
    # reconstruction, the dark domains a few grey levels above that background, stripes
    # elongated in the plane, edge glow, streaks and rings, quantised to 8 bits.
    "sweep": {
        "shape": (48, 256, 256),
        "tilt_deg": 25.0,
        "support_radius": 0.125,
        "ellipticity": 2.4,
        "pattern": "labyrinth",
        "domain_period": 22.0,
        "elongation": 2.5,
        "elongation_deg": 30.0,
        "anisotropy": 1.5,
        "minus_level": 0.05,
        "edge_glow": 0.6,
        "rings": 0.3,
        "mask_margin": 2,
        "bit_depth": 8,
        "dark_level": 6.0,
        "snr": 4.0,
        "shading": 0.2,
    },
    # The acquisition simulated instead of painted (acquisition: projections): each slice of
    # the object projected over a 130 degree tilt range (a 50 degree missing wedge), photon
    # noise in the projections, miscalibrated detector pixels (rings), a slow gain drift along
    # z, reconstructed by filtered back-projection. Masked with --mask-margin N.
    "tomo": {
        "acquisition": "projections",
        "tilt_deg": 10.0,
        "ellipticity": 1.3,
        "elongation": 2.0,
        "elongation_deg": 30.0,
        "n_angles": 65,
        "missing_wedge_deg": 50.0,
        "detector_offsets": 0.3,
        "z_drift": 0.3,
        "snr": 1.0,
    },
}


@dataclass
class Phantom:
    """A synthetic volume: ``image`` float32 (z, y, x), ``labels`` uint8 (z, y, x)."""

    image: np.ndarray
    labels: np.ndarray
    params: dict[str, Any] = field(default_factory=dict)


def make_phantom(
    shape: tuple[int, int, int] = DEFAULTS["shape"],
    *,
    snr: float | None = DEFAULTS["snr"],
    seed: int = DEFAULTS["seed"],
    support: str = DEFAULTS["support"],
    tilt_deg: float = DEFAULTS["tilt_deg"],
    domain_period: float = DEFAULTS["domain_period"],
    pattern: str = DEFAULTS["pattern"],
    anisotropy: float = DEFAULTS["anisotropy"],
    wall_width: float = DEFAULTS["wall_width"],
    blur_sigma: float = DEFAULTS["blur_sigma"],
    n_angles: int = DEFAULTS["n_angles"],
    missing_wedge_deg: float = DEFAULTS["missing_wedge_deg"],
    edge_glow: float = DEFAULTS["edge_glow"],
    swirl: float = DEFAULTS["swirl"],
    net_magnetization: float = DEFAULTS["net_magnetization"],
    minus_level: float = DEFAULTS["minus_level"],
    noise_correlation: float = DEFAULTS["noise_correlation"],
    shading: float = DEFAULTS["shading"],
    support_radius: float = DEFAULTS["support_radius"],
    ellipticity: float = DEFAULTS["ellipticity"],
    elongation: float = DEFAULTS["elongation"],
    elongation_deg: float = DEFAULTS["elongation_deg"],
    rings: float = DEFAULTS["rings"],
    mask_margin: int = DEFAULTS["mask_margin"],
    bit_depth: int = DEFAULTS["bit_depth"],
    encoding: str = DEFAULTS["encoding"],
    dark_level: float = DEFAULTS["dark_level"],
    bright_level: float = DEFAULTS["bright_level"],
    acquisition: str = DEFAULTS["acquisition"],
    detector_offsets: float = DEFAULTS["detector_offsets"],
    z_drift: float = DEFAULTS["z_drift"],
) -> Phantom:
    """Generate a phantom volume and its ground-truth labels: domains in a sample support,
    seen through blur, tomography and noise (module docstring). ``PARAMETERS`` says what each
    keyword means; the same seed and parameters give a bit-identical phantom.
    """
    args = dict(locals())  # every parameter, for the checks and the record
    shape = _check_params(args)
    noisy = snr is not None and math.isfinite(snr)
    # One independent stream per part (module docstring): a change of snr changes only the
    # noise, and the shading depends on the seed alone.
    rng_field, rng_swirl, rng_noise, rng_shading = (
        np.random.default_rng(s) for s in np.random.SeedSequence(int(seed)).spawn(4)
    )
    support_mask, labels, signal = _sample(shape, args, rng_field, rng_swirl)
    if acquisition == "projections":
        signal, contrast, noise_std = acquire(
            signal, labels, support_mask, n_angles, missing_wedge_deg, snr if noisy else None,
            detector_offsets, z_drift, rng_noise, rng_shading)
    elif n_angles > 0:
        signal = limited_angle_reconstruction(signal, n_angles, missing_wedge_deg)

    if acquisition == "image":
        signal, contrast, noise_std = _paint_artefacts(
            signal, labels, rings, shading, snr if noisy else None, noise_correlation, n_angles,
            missing_wedge_deg, rng_noise, rng_shading)
    image = _encode(signal, labels, support_mask, contrast, args)
    params = {"generator": "magseg_hpc.data.phantom.make_phantom", **_record(args, noisy),
              "contrast": contrast, "noise_std": float(noise_std), "snr_definition":
              "(mean of noise-free image over label 2 - over label 1) / noise std"}
    log.debug("phantom %s: contrast %.3f, noise std %.3f", shape, contrast, noise_std)
    return Phantom(image=image, labels=labels, params=params)


def _sample(shape: tuple[int, int, int], a: dict, rng_field: np.random.Generator,
            rng_swirl: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Steps 1-4 of the module docstring, then the blur: (support, labels, signal)."""
    tilt = math.radians(a["tilt_deg"])
    support_mask = _support(shape, a["support"], tilt, a["support_radius"], a["ellipticity"])
    if not support_mask.any():
        raise MagsegError(f"shape {shape} is too small for a {a['support']} support; use >= 8 "
                          "voxels")
    domain_field = _domain_field(shape, rng_field, a["domain_period"], a["pattern"],
                                 a["anisotropy"], tilt, a["elongation"],
                                 math.radians(a["elongation_deg"]))
    if a["swirl"] > 0:
        domain_field = _swirl(domain_field, rng_swirl, a["swirl"], a["domain_period"])
    # Threshold at the in-support quantile so the class balance is what was asked for.
    threshold = np.quantile(domain_field[support_mask], (1.0 - a["net_magnetization"]) / 2.0)
    domain_field -= threshold

    labels = np.zeros(shape, dtype=np.uint8)
    labels[support_mask] = np.where(domain_field[support_mask] > 0, 2, 1)

    magnetization = _walls(domain_field, a["wall_width"])
    del domain_field
    minus = a["minus_level"]
    signal = support_mask * (minus + (1.0 - minus) * (magnetization + 1.0) / 2.0)
    del magnetization
    if a["edge_glow"] > 0:
        signal += a["edge_glow"] * _rim(support_mask)
    if a["blur_sigma"] > 0:
        signal = ndimage.gaussian_filter(signal, a["blur_sigma"], mode="constant")
    return support_mask, labels, signal


def _paint_artefacts(signal, labels, rings, shading, snr, noise_correlation, n_angles,
                     missing_wedge_deg, rng_noise, rng_shading):
    """Steps 5-7 of the module docstring on the reconstruction: rings, shading, then noise
    at ``snr`` (None: none); (signal, contrast, noise std)."""
    contrast = float(signal[labels == 2].mean() - signal[labels == 1].mean())
    if rings > 0:
        signal += rings * abs(contrast) * ring_pattern(signal.shape[1:], rng_shading)[None]
    if shading > 0:
        signal = shade(signal, rng_shading, shading, contrast)
    contrast = float(signal[labels == 2].mean() - signal[labels == 1].mean())
    noise_std = noise_std_for(contrast, snr)
    if snr is not None:
        signal += noise_std * reconstruction_noise(
            signal.shape, rng_noise, noise_correlation, n_angles, missing_wedge_deg
        )
    return signal, contrast, noise_std


def _encode(signal, labels, support_mask, contrast, a) -> np.ndarray:
    """The image of the float reconstruction ``signal`` in ``a["encoding"]``, every encoding
    from the same ``signal`` so they are one sample (PARAMETERS["encoding"])."""
    encoding, margin, bit_depth = a["encoding"], a["mask_margin"], a["bit_depth"]
    if encoding != "intensity" and margin < 0:
        margin = 2  # the published sweep's margin
    if encoding in ("intensity", "uint8-masked"):
        bit_depth = 8 if encoding == "uint8-masked" else bit_depth
        image = _as_published(signal, labels, support_mask, contrast, margin, bit_depth,
                              a["dark_level"], a["bright_level"])
        return image.astype(np.uint8 if bit_depth == 8 else np.float32)
    if encoding == "unmasked":
        return (_unmasked_signed(signal, labels, support_mask, a) / contrast).astype(np.float32)
    # Zero magnetisation is the class midpoint inside the sample and 0 outside: taking off
    # mid inside the kept region D puts it at 0 on both sides, so the outside sits between
    # the classes (as in a signed reconstruction), not below both; inside D the values stay
    # an affine map of the other encodings'.
    kept = _dilated(support_mask, margin)
    mid = (float(signal[labels == 1].mean()) + float(signal[labels == 2].mean())) / 2.0
    signed = (signal - mid * kept) / contrast
    signed[~kept] = 0.0 if encoding == "signed" else np.nan
    return signed.astype(np.float32)


def _unmasked_signed(signal, labels, support_mask, a) -> np.ndarray:
    """The unmasked signed image: each slice's class midpoint taken off as the reconstruction
    sees the support (the support through the same blur and limited-angle reconstruction), so
    the outside holds no smear of a mean the magnetization does not have (noise and the
    domains' streaks around 0). Scaled per slice so the two classes' means are symmetric
    about 0 there: the seen support's gain differs from the sample's (FBP, drift, shading)."""
    seen = support_mask.astype(np.float32)
    if a["blur_sigma"] > 0:
        seen = ndimage.gaussian_filter(seen, a["blur_sigma"], mode="constant")
    if a["n_angles"] > 0:
        seen = limited_angle_reconstruction(seen, a["n_angles"], a["missing_wedge_deg"])
    signed = signal.astype(np.float64)
    for plane, plane_labels, plane_seen in zip(signed, labels, seen):
        classes = [plane_labels == c for c in (1, 2)]
        if not all(c.any() for c in classes):
            continue  # no sample (or one class) in this slice: nothing to take off
        seen_sum = sum(float(plane_seen[c].mean()) for c in classes)
        if seen_sum > 0:
            plane -= sum(float(plane[c].mean()) for c in classes) / seen_sum * plane_seen
    return signed


def _dilated(support_mask: np.ndarray, margin: int) -> np.ndarray:
    """The support grown by ``margin`` >= 0 voxels: what a masked reconstruction keeps."""
    if margin > 0:
        return ndimage.binary_dilation(support_mask, iterations=int(margin))
    return support_mask


def _as_published(signal, labels, support_mask, contrast, mask_margin, bit_depth, dark_level,
                  bright_level):
    """Masked to exact 0 beyond ``mask_margin`` voxels outside the sample (-1: not masked)
    and quantised to 8 bits (``bit_depth`` 8), as published reconstructions are."""
    if mask_margin >= 0:
        signal[~_dilated(support_mask, mask_margin)] = 0.0
    if bit_depth == 8:
        dark = float(signal[labels == 1].mean())
        gain = (bright_level - dark_level) / max(abs(contrast), 1e-12)
        inside = signal != 0.0 if mask_margin >= 0 else np.ones(signal.shape, bool)
        quantised = np.clip(np.rint((signal - dark) * gain + dark_level), 0, 255)
        signal = np.where(inside, quantised, 0.0)
    return signal


def preset_params(preset: str, **overrides: Any) -> dict[str, Any]:
    """make_phantom keyword arguments: the preset's values, then ``overrides`` (not None)."""
    _check_choice("preset", preset, tuple(PRESETS))
    params = {**DEFAULTS, **PRESETS[preset]}
    params.update({k: v for k, v in overrides.items() if v is not None})
    return params


def write_phantom(path: str | Path, phantom: Phantom, overwrite: bool = False) -> None:
    """Write ``phantom`` as an image store with ground-truth ``labels``; params go to attrs."""
    write_image_store(
        path,
        phantom.image,
        labels=phantom.labels,
        class_table=ClassTable.default(),
        attrs={"phantom": phantom.params},
        overwrite=overwrite,
    )


# --- validation -----------------------------------------------------------------------------


def _check_params(a: dict) -> tuple[int, int, int]:
    """Refuse a parameter out of its range, in one line naming it; the checked shape."""
    shape = _check_shape(a["shape"])
    _check_choice("support", a["support"], SUPPORTS)
    _check_choice("pattern", a["pattern"], PATTERNS)
    _check_range("tilt_deg", a["tilt_deg"], -180.0, 180.0)
    _check_range("domain_period", a["domain_period"], 2.0, None)
    _check_range("anisotropy", a["anisotropy"], 1.0, None)
    _check_range("wall_width", a["wall_width"], 0.0, None)
    _check_range("blur_sigma", a["blur_sigma"], 0.0, None)
    _check_range("n_angles", a["n_angles"], 0, None)
    _check_range("missing_wedge_deg", a["missing_wedge_deg"], 0.0, 170.0)
    _check_range("edge_glow", a["edge_glow"], 0.0, None)
    _check_range("swirl", a["swirl"], 0.0, None)
    _check_range("net_magnetization", a["net_magnetization"], -0.9, 0.9)
    _check_range("minus_level", a["minus_level"], 0.0, 0.99)
    _check_range("noise_correlation", a["noise_correlation"], 0.0, None)
    _check_range("shading", a["shading"], 0.0, 0.9)
    _check_range("support_radius", a["support_radius"], 0.02, 0.5)
    _check_range("ellipticity", a["ellipticity"], 1.0, 10.0)
    _check_range("elongation", a["elongation"], 1.0, 10.0)
    _check_range("elongation_deg", a["elongation_deg"], -360.0, 360.0)
    _check_range("rings", a["rings"], 0.0, None)
    _check_range("mask_margin", a["mask_margin"], -1, None)
    _check_choice("bit_depth", a["bit_depth"], (0, 8))
    _check_choice("encoding", a["encoding"], ENCODINGS)
    _check_choice("acquisition", a["acquisition"], ACQUISITIONS)
    _check_range("detector_offsets", a["detector_offsets"], 0.0, None)
    _check_range("z_drift", a["z_drift"], 0.0, 0.9)
    if a["acquisition"] == "projections" and a["n_angles"] < 2:
        raise MagsegError("acquisition projections needs n_angles >= 2 (the tilt series)")
    _check_range("dark_level", a["dark_level"], 0.0, 255.0)
    _check_range("bright_level", a["bright_level"], a["dark_level"] + 1.0, 255.0)
    if a["snr"] is not None and not (a["snr"] > 0):
        raise MagsegError(f"snr must be > 0 (or None for no noise), got {a['snr']}")
    if a["seed"] is None or int(a["seed"]) < 0:
        raise MagsegError(f"seed must be a non-negative integer, got {a['seed']}")
    return shape


def _record(a: dict, noisy: bool) -> dict:
    """The parameters as plain JSON values, for the store's attributes."""
    ints = ("seed", "n_angles", "mask_margin", "bit_depth")
    texts = ("support", "pattern", "acquisition", "encoding")
    out = {}
    for key, value in a.items():
        if key == "shape":
            out[key] = [int(n) for n in value]
        elif key == "snr":
            out[key] = float(value) if noisy else None
        else:
            out[key] = int(value) if key in ints else value if key in texts else float(value)
    return out


def _check_shape(shape: Any) -> tuple[int, int, int]:
    try:
        out = tuple(int(s) for s in shape)
    except (TypeError, ValueError):
        raise MagsegError(f"shape must be three integers Z,Y,X, got {shape!r}") from None
    if len(out) != 3 or min(out) < 4:
        raise MagsegError(f"shape must be three integers Z,Y,X each >= 4, got {shape!r}")
    return out  # type: ignore[return-value]


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise MagsegError(f"{name} must be one of {', '.join(choices)}; got {value!r}")


def _check_range(name: str, value: float, low: float | None, high: float | None) -> None:
    ok = value is not None and math.isfinite(value)
    ok = ok and (low is None or value >= low) and (high is None or value <= high)
    if not ok:
        bounds = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise MagsegError(f"{name} must be {bounds}, got {value!r}")


# --- geometry -------------------------------------------------------------------------------


def _tilted_coords(shape: tuple[int, int, int], tilt: float) -> tuple[np.ndarray, ...]:
    """Centred coordinates (z', y', x) rotated by ``tilt`` about x, broadcastable."""
    nz, ny, nx = shape
    z = (np.arange(nz) - (nz - 1) / 2.0)[:, None, None]
    y = (np.arange(ny) - (ny - 1) / 2.0)[None, :, None]
    x = (np.arange(nx) - (nx - 1) / 2.0)[None, None, :]
    c, s = math.cos(tilt), math.sin(tilt)
    return c * z + s * y, c * y - s * z, x


def _support(shape: tuple[int, int, int], support: str, tilt: float, radius: float = 0.38,
             ellipticity: float = 1.0) -> np.ndarray:
    nz, ny, nx = shape
    zt, yt, x = _tilted_coords(shape, tilt)
    x = x / ellipticity
    if support == "pillar":
        radius = radius * min(ny, nx)
        mask = yt**2 + x**2 <= radius**2
    elif support == "cylinder":
        radius = radius / 0.38 * 0.44 * min(ny, nx)
        mask = (yt**2 + x**2 <= radius**2) & (np.abs(zt) <= 0.4 * nz)
    else:  # slab: a film of finite lateral extent, normal along y
        mask = (np.abs(yt) <= 0.22 * ny) & (np.abs(x) <= 0.45 * nx) & (np.abs(zt) <= 0.5 * nz)
    return np.broadcast_to(mask, shape).copy()


def _rim(support_mask: np.ndarray) -> np.ndarray:
    """A bright band just inside the boundary, peak 1 (reconstruction overshoot at edges)."""
    rim = ndimage.gaussian_gradient_magnitude(support_mask.astype(np.float32), 1.2)
    peak = float(rim.max())
    if peak > 0:
        rim /= peak
    # Mostly inside the sample: the glow of a real reconstruction hugs the inner surface.
    return rim * (0.35 + 0.65 * support_mask)


# --- domains --------------------------------------------------------------------------------


def _domain_field(
    shape: tuple[int, int, int],
    rng: np.random.Generator,
    period: float,
    pattern: str,
    anisotropy: float,
    tilt: float,
    elongation: float = 1.0,
    elongation_angle: float = 0.0,
) -> np.ndarray:
    """Band-passed Gaussian random field with unit standard deviation (float64)."""
    nz, ny, nx = shape
    white = rng.standard_normal(shape)
    spectrum = np.fft.rfftn(white)
    kz = np.fft.fftfreq(nz)[:, None, None]
    ky = np.fft.fftfreq(ny)[None, :, None]
    kx = np.fft.rfftfreq(nx)[None, None, :]
    # Rotate wave vectors with the support so domains follow the tilted axis.
    c, s = math.cos(tilt), math.sin(tilt)
    kzt, kyt = c * kz + s * ky, c * ky - s * kz
    # Elongated along the in-plane direction (cos a, sin a) in (x, y): its wave-vector
    # component is stretched, so features are longer that way.
    ca, sa = math.cos(elongation_angle), math.sin(elongation_angle)
    k_along = elongation * (kx * ca + kyt * sa)
    k_across = -kx * sa + kyt * ca
    k_plane = np.sqrt(k_along**2 + k_across**2)
    k_eff = np.sqrt(k_plane**2 + (anisotropy * kzt) ** 2)
    k0 = 1.0 / period
    bandwidth = 0.18 * k0
    filt = np.exp(-0.5 * ((k_eff - k0) / bandwidth) ** 2)
    if pattern == "stripes":
        direction = rng.uniform(0.0, math.pi)
        # Angle between the wave vector and the in-plane stripe normal, folded to [0, pi/2]:
        # a narrow cone of wave vectors gives lamellae that run straight through z.
        along = np.abs(kx * math.cos(direction) + kyt * math.sin(direction))
        dphi = np.arccos(np.clip(along / np.maximum(k_eff, 1e-12), 0.0, 1.0))
        filt = filt * np.exp(-0.5 * (dphi / math.radians(12.0)) ** 2)
    filt[0, 0, 0] = 0.0
    out = np.fft.irfftn(spectrum * filt, s=shape, axes=(0, 1, 2))
    std = float(out.std())
    if std == 0:
        raise MagsegError(f"domain_period {period} is too large for shape {shape}")
    return out / std


def _swirl(domain_field: np.ndarray, rng: np.random.Generator, strength: float, period: float):
    """Twist the pattern around a few in-plane centres (vortex-like domain swirls)."""
    nz, ny, nx = domain_field.shape
    yy, xx = np.meshgrid(np.arange(ny, dtype=np.float64), np.arange(nx), indexing="ij")
    n_centres = max(1, round(ny * nx / (6.0 * period) ** 2))
    dy = np.zeros((ny, nx))
    dx = np.zeros((ny, nx))
    for _ in range(n_centres):
        cy, cx = rng.uniform(0, ny), rng.uniform(0, nx)
        radius = rng.uniform(1.0, 2.5) * period
        angle = strength * rng.choice([-1.0, 1.0])
        ry, rx = yy - cy, xx - cx
        theta = angle * np.exp(-(ry**2 + rx**2) / (2.0 * radius**2))
        cos_t, sin_t = np.cos(theta), np.sin(theta)
        dy += (cos_t * ry - sin_t * rx) - ry
        dx += (sin_t * ry + cos_t * rx) - rx
    src_y = yy + dy
    src_x = xx + dx
    out = np.empty_like(domain_field)
    for z in range(nz):
        out[z] = ndimage.map_coordinates(domain_field[z], [src_y, src_x], order=1, mode="reflect")
    return out


def _walls(domain_field: np.ndarray, wall_width: float) -> np.ndarray:
    """tanh magnetization profile whose walls are about ``wall_width`` voxels wide."""
    if wall_width <= 0:
        return np.sign(domain_field)
    # The field changes by |grad f| per voxel near a wall; scale so tanh spans wall_width.
    grad = np.sqrt(sum(g**2 for g in np.gradient(domain_field)))
    scale = float(np.median(grad)) * wall_width / 2.0
    return np.tanh(domain_field / max(scale, 1e-12))
