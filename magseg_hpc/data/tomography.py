"""How a tomography makes the phantom's image: the artefacts of a limited-angle
reconstruction painted on the object (``acquisition: image``), or the acquisition simulated
and reconstructed (``acquisition: projections``, the ``tomo`` preset). ``phantom.py`` makes
the object and its labels and calls these."""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage

from magseg_hpc.errors import MagsegError


def ring_pattern(plane: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """Ring artifacts: thin concentric rings of random sign about the rotation axis, peak 1."""
    ny, nx = plane
    y = (np.arange(ny) - (ny - 1) / 2.0)[:, None]
    x = (np.arange(nx) - (nx - 1) / 2.0)[None, :]
    r = np.sqrt(y**2 + x**2)
    out = np.zeros(plane)
    for _ in range(max(3, min(ny, nx) // 16)):
        radius = rng.uniform(2.0, 0.5 * min(ny, nx))
        out += rng.choice([-1.0, 1.0]) * rng.uniform(0.4, 1.0) * np.exp(
            -0.5 * ((r - radius) / 0.7) ** 2)
    return out / max(float(np.abs(out).max()), 1e-12)


def limited_angle_reconstruction(
    volume: np.ndarray, n_angles: int, missing_wedge_deg: float
) -> np.ndarray:
    """Radon-project each z slice over a limited range and reconstruct by filtered BP."""
    import warnings

    from skimage.transform import iradon, radon

    nz, ny, nx = volume.shape
    size = max(ny, nx)
    pad_y, pad_x = (size - ny) // 2, (size - nx) // 2
    span = 180.0 - missing_wedge_deg
    theta = tilt_angles(n_angles, missing_wedge_deg)
    square = np.zeros((size, size), dtype=np.float64)
    out = np.empty(volume.shape, dtype=np.float64)
    with warnings.catch_warnings():
        # radon warns when a slab's corners poke out of the inscribed circle; circle=False
        # pads to the diagonal, so nothing is lost.
        warnings.simplefilter("ignore", UserWarning)
        for z in range(nz):
            square[pad_y : pad_y + ny, pad_x : pad_x + nx] = volume[z]
            sinogram = radon(square, theta=theta, circle=False)
            recon = iradon(
                sinogram, theta=theta, output_size=size, circle=False, filter_name="ramp"
            )
            out[z] = recon[pad_y : pad_y + ny, pad_x : pad_x + nx]
    # FBP over a partial range loses intensity in proportion to the missing range.
    return out * (180.0 / span)


BAD_PIXELS = 0.03  # the share of detector pixels with a large offset (rings)


def acquire(obj: np.ndarray, labels: np.ndarray, support: np.ndarray, n_angles: int,
             missing_wedge_deg: float, snr: float | None, detector_offsets: float,
             z_drift: float, rng_noise: np.random.Generator,
             rng_detector: np.random.Generator) -> tuple[np.ndarray, float, float]:
    """A limited-angle tomography of ``obj`` and its filtered back-projection, per z slice
    (each detector row sees one slice, parallel beam): (reconstruction, contrast, noise std).

    - projections over ``180 - missing_wedge_deg`` degrees (the missing wedge);
    - a slow gain drift along z: ``1 + z_drift g(z)``, g a sum of two random cosines of at
      most one period over the volume, scaled to max |g| = 1 (beam profile, sample drift);
    - detector offsets: a few bad detector pixels (BAD_PIXELS of them, offsets 10x the
      others'), the same for every row within +-1/3, constant over the tilt series (flat-field
      errors), which FBP turns into rings;
    - photon noise, Gaussian limit of Poisson counts: a projection value p is measured with
      std proportional to ``sqrt(exp(p / p_max))``, noisier through the thickest paths.

    FBP is linear, so the clean, ring and noise parts are reconstructed apart and scaled in
    the image: rings to ``detector_offsets`` times the domain contrast (std in the sample),
    noise to contrast / ``snr`` (the SNR definition of make_phantom).
    """
    import warnings

    from skimage.transform import iradon, radon

    nz, ny, nx = obj.shape
    size = max(ny, nx)
    pad_y, pad_x = (size - ny) // 2, (size - nx) // 2
    theta = tilt_angles(n_angles, missing_wedge_deg)
    zz = np.linspace(0.0, 1.0, nz)
    drift = sum(np.cos(2 * math.pi * rng_detector.uniform(0.2, 1.0) * zz
                       + rng_detector.uniform(0, 2 * math.pi)) for _ in range(2))
    gain = 1.0 + z_drift * drift / max(float(np.abs(drift).max()), 1e-12)
    square = np.zeros((size, size))
    parts = {k: np.empty(obj.shape) for k in ("clean", "rings", "noise")}
    base_offsets = None

    def fbp(sinogram):
        recon = iradon(sinogram, theta=theta, output_size=size, circle=False,
                       filter_name="ramp")
        return recon[pad_y:pad_y + ny, pad_x:pad_x + nx]

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # radon: corners outside the circle
        for z in range(nz):
            square[pad_y:pad_y + ny, pad_x:pad_x + nx] = obj[z]
            sinogram = radon(square, theta=theta, circle=False) * gain[z]
            n_det = sinogram.shape[0]
            if base_offsets is None:  # a few bad pixels on a small spread: sharp rings
                bad = rng_detector.random(n_det) < BAD_PIXELS
                base_offsets = rng_detector.standard_normal(n_det) * np.where(bad, 1.0, 0.1)
            offsets = base_offsets * (1 + rng_detector.standard_normal(n_det) / 3)
            photon_std = np.sqrt(np.exp(sinogram / max(float(sinogram.max()), 1e-12)))
            parts["clean"][z] = fbp(sinogram)
            parts["rings"][z] = fbp(np.repeat(offsets[:, None], len(theta), axis=1))
            parts["noise"][z] = fbp(photon_std * rng_noise.standard_normal(sinogram.shape))
    # FBP over a partial range loses intensity in proportion to the missing range.
    signal = parts["clean"] * (180.0 / (180.0 - missing_wedge_deg))
    contrast = float(signal[labels == 2].mean() - signal[labels == 1].mean())
    if detector_offsets > 0:
        rings = parts["rings"]
        signal += rings * (detector_offsets * abs(contrast)
                           / max(float(rings[support].std()), 1e-12))
    noise_std = noise_std_for(contrast, snr)
    if snr is not None:
        noise = parts["noise"]
        signal += noise * (noise_std / max(float(noise.std()), 1e-12))
    return signal, contrast, noise_std


def noise_std_for(contrast: float, snr: float | None) -> float:
    """The noise std that gives ``snr`` over the domain ``contrast`` (make_phantom's SNR
    definition; None: no noise, 0); refused where it would overflow the float32 image."""
    if snr is None:
        return 0.0
    noise_std = abs(contrast) / float(snr)
    if not noise_std < np.finfo(np.float32).max / 1e3:
        raise MagsegError(f"snr {snr:g} is too small: noise of std {noise_std:g} overflows "
                          "the float32 image; use snr >= 1e-30")
    return noise_std


def shade(signal: np.ndarray, rng: np.random.Generator, strength: float,
           contrast: float) -> np.ndarray:
    """Radial cupping x smooth 3D gain drift + per-slice offsets (module docstring)."""
    nz, ny, nx = signal.shape
    y = (np.arange(ny) - (ny - 1) / 2.0)[:, None]
    x = (np.arange(nx) - (nx - 1) / 2.0)[None, :]
    rho2 = (y**2 + x**2) / (0.5 * min(ny, nx)) ** 2
    cupping = 1.0 - strength * np.clip(1.0 - rho2, 0.0, 1.0)
    # Lowest frequencies only: 0 to 1 periods across the volume along each axis.
    zz, yy, xx = (np.linspace(0.0, 1.0, n)[idx] for n, idx in
                  ((nz, np.s_[:, None, None]), (ny, np.s_[None, :, None]),
                   (nx, np.s_[None, None, :])))
    drift = np.zeros((nz, ny, nx))
    for _ in range(3):
        kz, ky, kx = rng.uniform(0.0, 1.0, 3)
        phase = rng.uniform(0.0, 2.0 * math.pi)
        drift += np.cos(2.0 * math.pi * (kz * zz + ky * yy + kx * xx) + phase)
    drift /= max(float(np.abs(drift).max()), 1e-12)
    offsets = (strength / 3.0) * abs(contrast) * rng.standard_normal(nz)[:, None, None]
    return signal * cupping[None] * (1.0 + 0.5 * strength * drift) + offsets


def reconstruction_noise(
    shape: tuple[int, int, int],
    rng: np.random.Generator,
    correlation: float,
    n_angles: int,
    missing_wedge_deg: float,
) -> np.ndarray:
    """Unit-std Gaussian noise with the texture of the reconstruction.

    With projections, the noise is white noise in each slice's sinogram pushed through the
    same filtered back-projection: ramp-filtered, streaky along the projection angles,
    independent between slices. Without, it is white. ``correlation`` smooths it further.
    """
    if n_angles > 0:
        from skimage.transform import iradon

        nz, ny, nx = shape
        size = max(ny, nx)
        pad_y, pad_x = (size - ny) // 2, (size - nx) // 2
        theta = tilt_angles(n_angles, missing_wedge_deg)
        n_det = int(math.ceil(math.sqrt(2) * size))
        noise = np.empty(shape, dtype=np.float64)
        for z in range(nz):
            sinogram = rng.standard_normal((n_det, n_angles))
            recon = iradon(sinogram, theta=theta, output_size=size, circle=False)
            noise[z] = recon[pad_y : pad_y + ny, pad_x : pad_x + nx]
    else:
        noise = rng.standard_normal(shape)
    if correlation > 0:
        noise = ndimage.gaussian_filter(noise, correlation, mode="wrap")
    return noise / float(noise.std())


def tilt_angles(n_angles: int, missing_wedge_deg: float) -> np.ndarray:
    return np.linspace(0.0, 180.0 - missing_wedge_deg, n_angles, endpoint=False)
