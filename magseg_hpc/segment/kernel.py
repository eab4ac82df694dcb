"""The per-slab kernel: plain numpy in, plain numpy out, no Dask, no stores.

``segment_slab`` normalises a stack of 2D slices with the checkpoint's intensity normalisation,
runs the model over batches of slices, turns logits into class probabilities (softmax),
optionally averages flipped passes (test-time augmentation) in probability space, and returns
uint8 labels (argmax of the float probabilities) and, when asked, uint8-quantised probabilities
(``round(p * 255)``). The Dask wrapper in ``worker.py`` only reads, calls this, and writes.

2.5D models (``context_slices`` k > 1) see each slice with its k // 2 neighbours on each side
as channels: the caller passes the slab with that many halo slices (fewer at the volume's
faces, where the end slice is repeated, as in training).

On a masked reconstruction (the normalisation's ``support``: everything outside the sample
one exact value or NaN, ``magseg_hpc.volume.support``), voxels outside the sample's support
are background whatever the model says: the support of each slice is the convex hull of its
pixels that are not the outside encoding (``support.plane_support``: dark domains can be the
masked value itself and touch the sample's edge). Orthoplane runs apply it once, on the fused
z slices (``support_outside``), where the sample's outline is its cross-section.

A masked sample fills a small part of a large field of view, and most y and x planes beside a
tilted pillar hold none of it: a plane whose pixels (and its context slices') are all masked
is background without running the model (``planes_with_sample``), as the support rule makes
it anyway (orthoplane: that plane's vote in the fusion is background). Planes that hold some
of the sample run whole, not cropped to a window around it: the decoder's image-pooling branch
averages over the entire plane, so a window changes its output (a 32 px margin changed 4 % of
the sample's labels and cost 0.005 mIoU, ``benchmarks/results/masked.md``).
"""

from __future__ import annotations

import numpy as np
import torch

from magseg_hpc.data.normalize import apply_normalization, marks_outside
from magseg_hpc.precision import autocast
from magseg_hpc.volume.support import is_masked, outside_planes, planes_with_sample, support_of

# Flips averaged by --tta, as tensor dims of a (B, C, H, W) batch: horizontal, vertical, both.
TTA_FLIPS: tuple[tuple[int, ...], ...] = ((3,), (2,), (2, 3))


def _logits(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = model(x)
    return out["out"] if isinstance(out, dict) else out


def predict_probabilities(model: torch.nn.Module, x: torch.Tensor, tta: bool) -> torch.Tensor:
    """Class probabilities (B, C, H, W) for a normalised batch (B, 1, H, W)."""
    probs = torch.softmax(_logits(model, x).float(), dim=1)
    if tta:
        for dims in TTA_FLIPS:
            flipped = torch.softmax(_logits(model, torch.flip(x, dims)).float(), dim=1)
            probs += torch.flip(flipped, dims)
        probs /= 1 + len(TTA_FLIPS)
    return probs


def quantize(probs: torch.Tensor) -> torch.Tensor:
    """Probabilities in [0, 1] to uint8 0..255 (what stores and fusion keep)."""
    return torch.round(probs.clamp(0, 1) * 255).to(torch.uint8)


def segment_slab(
    model: torch.nn.Module,
    slices: np.ndarray,
    normalization: dict,
    *,
    num_classes: int,
    batch_size: int = 8,
    tta: bool = False,
    device: str | torch.device = "cpu",
    with_probabilities: bool = False,
    context: int = 1,
    before: int = 0,
    count: int | None = None,
    precision: str = "fp32",
    force_support: bool = True,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Segment ``count`` slices of raw intensities starting at ``slices[before]``;
    ``slices`` (N, H, W) holds them plus the halo a 2.5D model needs (module docstring).

    ``force_support=False`` leaves the masked background to the caller (orthoplane passes).
    Returns ``labels`` uint8 (n, H, W) and ``probabilities`` uint8 (C, n, H, W) or None.
    Memory: the raw slab, the uint8 results and one batch of activations.
    """
    total, h, w = slices.shape
    n = total - before if count is None else count
    half = context // 2
    support = support_of(normalization)
    # each plane's support once (a plane is context for up to k slices); only when used
    first, last = max(before - half, 0), min(before + n + half + 1, total)
    needs_support = force_support or marks_outside(normalization)
    outside = (np.zeros((total, h, w), bool) if needs_support and is_masked(support)
               else None)
    if outside is not None:
        outside[first:last] = outside_planes(slices[first:last], support)
    labels = np.empty((n, h, w), np.uint8)
    probabilities = np.empty((num_classes, n, h, w), np.uint8) if with_probabilities else None
    background = torch.zeros((1, num_classes, 1, 1), device=device)  # one-hot class 0
    background[0, 0] = 1.0
    with torch.inference_mode():
        for start in range(0, n, batch_size):
            stop = min(start + batch_size, n)
            centres = np.arange(start, stop) + before
            idx = np.clip(centres[:, None] + np.arange(-half, half + 1)[None], 0, total - 1)
            raw = np.asarray(slices)[idx]
            # planes of nothing but masked background skip the model (module docstring)
            run = planes_with_sample(raw, support)
            probs = background.expand(len(centres), -1, h, w).clone()
            if run.any():
                probs[torch.from_numpy(run).to(device)] = _predict(
                    model, raw[run], normalization, device, precision, tta,
                    None if outside is None else outside[idx][run])
            if force_support and outside is not None:
                probs = torch.where(torch.from_numpy(outside[centres]).to(device)[:, None],
                                    background, probs)
            labels[start:stop] = class_argmax(probs).cpu().numpy()
            if probabilities is not None:
                probabilities[:, start:stop] = quantize(probs).cpu().numpy().transpose(1, 0, 2, 3)
    return labels, probabilities


def class_argmax(probs: torch.Tensor) -> torch.Tensor:
    """``probs.argmax(dim=1)`` as uint8 (ties to the lower class), by elementwise compares:
    torch's argmax over the class dim of an NCHW batch took a quarter of segment-volume's
    compute on a 600 x 600 volume, the compares 1/50 of that."""
    best, labels = probs[:, 0], torch.zeros(probs[:, 0].shape, dtype=torch.uint8,
                                            device=probs.device)
    for c in range(1, probs.shape[1]):
        labels[probs[:, c] > best] = c
        best = torch.maximum(best, probs[:, c])
    return labels


def _predict(model, raw, normalization, device, precision, tta, outside) -> torch.Tensor:
    x = torch.from_numpy(np.ascontiguousarray(
        apply_normalization(raw, normalization, outside), np.float32)).to(device)
    x = x.contiguous(memory_format=torch.channels_last)  # as load_inference_model's weights
    with autocast(device, precision):  # softmax is taken in float32 either way
        return predict_probabilities(model, x, tta)


def support_outside(slices: np.ndarray | None, support: dict) -> np.ndarray | None:
    """Pixels outside each slice's sample support (N, H, W), or None when nothing is masked."""
    if not is_masked(support):
        return None
    return outside_planes(slices, support)


def fuse_probabilities(
    parts: list[np.ndarray], outside: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Fuse per-axis uint8 probabilities (C, ...) by their mean: (labels, mean probabilities);
    ``outside`` (...) marks voxels that are background whatever the parts say.

    Summing in uint16 keeps it exact (argmax of the sum is argmax of the mean); ties go to the
    lower class index, as ``argmax`` does everywhere else.
    """
    total = np.zeros(parts[0].shape, np.uint16)
    for p in parts:
        total += p
    labels = total.argmax(axis=0).astype(np.uint8)
    mean = np.rint(total / len(parts)).astype(np.uint8)
    if outside is not None:  # the masked background (module docstring)
        labels[outside] = 0
        mean[:, outside] = 0
        mean[0][outside] = 255
    return labels, mean
