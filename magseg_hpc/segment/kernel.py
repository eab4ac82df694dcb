"""The per-slab kernel: plain numpy in, plain numpy out, no Dask, no stores.

``segment_slab`` normalises a stack of 2D slices with the checkpoint's intensity normalisation,
runs the model over batches of slices, turns logits into class probabilities (softmax),
optionally averages flipped passes (test-time augmentation) in probability space, and returns
uint8 labels (argmax of the float probabilities) and, when asked, uint8-quantised probabilities
(``round(p * 255)``). The Dask wrapper in ``worker.py`` only reads, calls this, and writes.
"""

from __future__ import annotations

import numpy as np
import torch

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
) -> tuple[np.ndarray, np.ndarray | None]:
    """Segment ``slices`` (n, H, W) of raw intensities.

    Returns ``labels`` uint8 (n, H, W) and ``probabilities`` uint8 (C, n, H, W) or None.
    Memory: the raw slab, the uint8 results and one batch of activations.
    """
    from magseg_hpc.data.normalize import apply_normalization

    n, h, w = slices.shape
    labels = np.empty((n, h, w), np.uint8)
    probabilities = np.empty((num_classes, n, h, w), np.uint8) if with_probabilities else None
    with torch.inference_mode():
        for start in range(0, n, batch_size):
            stop = min(start + batch_size, n)
            batch = apply_normalization(np.asarray(slices[start:stop]), normalization)
            x = torch.from_numpy(np.ascontiguousarray(batch, np.float32))[:, None].to(device)
            probs = predict_probabilities(model, x, tta)
            labels[start:stop] = probs.argmax(dim=1).to(torch.uint8).cpu().numpy()
            if probabilities is not None:
                probabilities[:, start:stop] = quantize(probs).cpu().numpy().transpose(1, 0, 2, 3)
    return labels, probabilities


def fuse_probabilities(parts: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Fuse per-axis uint8 probabilities (C, ...) by their mean: (labels, mean probabilities).

    Summing in uint16 keeps it exact (argmax of the sum is argmax of the mean); ties go to the
    lower class index, as ``argmax`` does everywhere else.
    """
    total = np.zeros(parts[0].shape, np.uint16)
    for p in parts:
        total += p
    labels = total.argmax(axis=0).astype(np.uint8)
    mean = np.rint(total / len(parts)).astype(np.uint8)
    return labels, mean
