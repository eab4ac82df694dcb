"""magseg-hpc make-phantom OUT.zarr: a synthetic tomography volume with exact ground truth."""

from __future__ import annotations

import logging
import os

from magseg_hpc.commands.common import int_triple
from magseg_hpc.data.phantom import (
    ACQUISITIONS,
    ENCODINGS,
    PARAMETERS,
    PATTERNS,
    PRESETS,
    SUPPORTS,
    make_phantom,
    preset_params,
    write_phantom,
)
from magseg_hpc.errors import MagsegError
from magseg_hpc.volume.store import IMAGE_FORMAT, refuse_existing

log = logging.getLogger(__name__)

# Every make_phantom parameter as a flag (its help is the parameter's meaning in PARAMETERS);
# a flag left out means the preset's value.
FLAGS = {
    "shape": int_triple,
    "snr": float,
    "seed": int,
    "support": str,
    "pattern": str,
    "tilt-deg": float,
    "support-radius": float,
    "ellipticity": float,
    "domain-period": float,
    "anisotropy": float,
    "elongation": float,
    "elongation-deg": float,
    "wall-width": float,
    "blur-sigma": float,
    "n-angles": int,
    "missing-wedge-deg": float,
    "edge-glow": float,
    "rings": float,
    "swirl": float,
    "net-magnetization": float,
    "minus-level": float,
    "noise-correlation": float,
    "shading": float,
    "mask-margin": int,
    "bit-depth": int,
    "encoding": str,
    "dark-level": float,
    "bright-level": float,
    "acquisition": str,
    "detector-offsets": float,
    "z-drift": float,
}
CHOICES = {"support": SUPPORTS, "pattern": PATTERNS, "bit-depth": (0, 8),
           "encoding": ENCODINGS, "acquisition": ACQUISITIONS}

# Peak working memory of make_phantom per voxel (float64 fields, FFTs, the FBP per slice),
# measured with tracemalloc at 32x96x96 (54 B) and rounded up.
BYTES_PER_VOXEL = 64


def memory_limit() -> int:
    """Half of this machine's physical memory: a phantom is made in memory, in one piece."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 2
    except (ValueError, OSError, AttributeError):
        return 8 * 2**30


def check_phantom_args(params: dict) -> None:
    snr = params["snr"]
    if not snr > 0:  # also refuses NaN
        raise MagsegError(f"--snr {snr}: must be > 0 (use --snr inf for no noise)")
    shape = params["shape"]
    voxels = shape[0] * shape[1] * shape[2]
    estimate, limit = voxels * BYTES_PER_VOXEL, memory_limit()
    if estimate > limit:
        raise MagsegError(
            f"--shape {','.join(map(str, shape))}: making it needs about "
            f"{estimate / 2**30:,.1f} GiB of memory, more than half of this machine's "
            f"({limit / 2**30:,.1f} GiB); choose a smaller shape"
        )


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "make-phantom",
        help="write a synthetic magnetization-tomography volume (image + ground-truth labels)",
        description="Generate a seeded phantom: domains in a sample support, seen through blur, "
        "limited-angle tomography artifacts, edge glow, low-frequency shading and noise. "
        "Writes `image` (float32) and `labels` (0 outside, 1 domain_minus, 2 domain_plus).",
    )
    p.add_argument("out", help="output zarr store")
    p.add_argument("--preset", choices=tuple(PRESETS), default="default",
                   help="named parameter set: default (a pillar filling the field of view, "
                   "float), elongated (a tilted elliptic pillar, domains elongated in the "
                   "plane, rings) or sweep (like a published 8-bit reconstruction: a small tilted "
                   "elliptic pillar in a large field of view, masked exact-zero background, "
                   "dark domains near it, rings, 8-bit) or tomo (the acquisition simulated: "
                   "a 130 degree tilt series with photon noise, detector offsets and drift, "
                   "reconstructed by filtered back-projection, SNR 1); flags below override it")
    for flag, kind in FLAGS.items():
        default, help_text = PARAMETERS[flag.replace("-", "_")]
        shown = ",".join(map(str, default)) if isinstance(default, tuple) else default
        p.add_argument(f"--{flag}", type=kind, default=None,
                       choices=CHOICES.get(flag),
                       help=f"{help_text} (default {shown}, or the preset's)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    p.set_defaults(func=run)


def run(args) -> int:
    # Refuse bad arguments and an existing output before spending seconds on the volume.
    params = preset_params(args.preset, **{flag.replace("-", "_"): getattr(
        args, flag.replace("-", "_")) for flag in FLAGS})
    check_phantom_args(params)
    refuse_existing(args.out, args.overwrite, IMAGE_FORMAT)
    shape = params.pop("shape")
    phantom = make_phantom(shape, **params)
    write_phantom(args.out, phantom, overwrite=args.overwrite)
    labels = phantom.labels
    n = labels.size
    fractions = ", ".join(
        f"{name} {100.0 * (labels == i).sum() / n:.1f}%"
        for i, name in enumerate(("background", "domain_minus", "domain_plus"))
    )
    log.info(
        "wrote %s: image %s %s, labels (%s), snr %s, seed %d",
        args.out, "x".join(map(str, labels.shape)), phantom.image.dtype, fractions,
        phantom.params["snr"], phantom.params["seed"],
    )
    return 0
