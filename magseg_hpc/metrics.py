"""Segmentation metrics shared by training validation and `magseg-hpc evaluate`.

Everything goes through one confusion matrix so training and evaluation report the same
numbers.

Conventions
-----------
* ``cm[t, p]`` counts voxels whose truth is ``t`` and prediction ``p`` (rows = truth,
  columns = prediction), int64.
* Voxels whose truth equals ``ignore`` (255 by default) are left out entirely, whatever the
  prediction. A truth label outside ``[0, C)`` that is not ``ignore`` is a data error and raises.
* A prediction outside ``[0, C)`` (e.g. 255 in a label store, or a negative value) is never
  dropped silently. By default it raises :class:`MagsegError`. With ``invalid_column=True``
  the matrix gets one extra column, ``cm[t, C]`` = voxels of truth ``t`` with an out-of-range
  prediction; :func:`scores_from_confusion` counts these as misses of ``t`` (they enlarge
  ``t``'s union and lower pixel accuracy) and as a false positive of no class.
* Scores are dataset-level: intersections and unions are summed over every voxel first, then
  IoU = I / U (not a mean of per-image IoUs).
* Empty-class rule: a class absent from both truth and prediction (U = 0) has IoU and Dice
  ``NaN``, ``present = False``, and is left out of mIoU and mean Dice. AugSeg's reference code
  uses I / (U + 1e-10), which scores such a class 0 and drags mIoU down on volumes that simply
  lack it; we report it as absent instead. A class present only in the prediction scores 0.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from magseg_hpc.errors import MagsegError

log = logging.getLogger(__name__)

__all__ = [
    "confusion_matrix",
    "scores_from_confusion",
    "volume_confusion",
    "per_slice_confusion",
    "per_slice_miou",
    "miou_from_slices",
]


def _is_torch(x: Any) -> bool:
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a hard dependency
        return False
    return isinstance(x, torch.Tensor)


def _check_num_classes(num_classes: int) -> int:
    num_classes = int(num_classes)
    if num_classes < 1:
        raise MagsegError(f"num_classes must be >= 1, got {num_classes}")
    return num_classes


def _bad_values_message(what: str, values: np.ndarray, count: int, num_classes: int) -> str:
    shown = ", ".join(str(int(v)) for v in values[:5])
    return f"{what} has {count} voxels with labels outside [0, {num_classes}) (e.g. {shown})"


def _confusion_numpy(
    pred: np.ndarray, truth: np.ndarray, num_classes: int, ignore: int | None, leading: int
) -> np.ndarray:
    """Kernel: bincount over (leading index, truth, pred-or-invalid).

    ``leading`` > 1 splits the count along axis 0 (one matrix per slice); returns
    (leading, C, C + 1) with the invalid-prediction column last.
    """
    c, k = num_classes, num_classes + 1
    truth = np.asarray(truth)
    pred = np.asarray(pred)
    valid = np.ones(truth.shape, dtype=bool) if ignore is None else truth != ignore
    t = truth.astype(np.int64, copy=False)
    p = pred.astype(np.int64, copy=False)
    bad_truth = valid & ((t < 0) | (t >= c))
    if bad_truth.any():
        raise MagsegError(
            _bad_values_message("truth", np.unique(t[bad_truth]), int(bad_truth.sum()), c)
            + f" that are not the ignore label {ignore}; fix the labels or pass --ignore"
        )
    p = np.where((p < 0) | (p >= c), c, p)
    idx = t * k + p
    if leading > 1:
        idx = idx + (np.arange(leading, dtype=np.int64) * (c * k)).reshape(
            (leading,) + (1,) * (idx.ndim - 1)
        )
    counts = np.bincount(idx[valid], minlength=leading * c * k)
    return counts.reshape(leading, c, k)


def _confusion_torch(pred, truth, num_classes: int, ignore: int | None):
    import torch

    c, k = num_classes, num_classes + 1
    truth = truth.reshape(-1)
    pred = pred.reshape(-1).to(truth.device)
    t = truth.long()
    p = pred.long()
    valid = torch.ones_like(t, dtype=torch.bool) if ignore is None else t != ignore
    t = t[valid]
    p = p[valid]
    bad_truth = (t < 0) | (t >= c)
    bad_pred = (p < 0) | (p >= c)
    p = torch.where(bad_pred, torch.full_like(p, c), p)
    # Out-of-range truth would alias other bins; clamp so bincount stays in bounds and raise
    # below (one host sync for both checks).
    counts = torch.bincount(t.clamp(0, c - 1) * k + p, minlength=c * k).reshape(c, k)
    n_bad_truth = int(bad_truth.sum())
    if n_bad_truth:
        values = torch.unique(t[bad_truth]).cpu().numpy()
        raise MagsegError(
            _bad_values_message("truth", values, n_bad_truth, c)
            + f" that are not the ignore label {ignore}; fix the labels or pass --ignore"
        )
    return counts


def _finish(counts, num_classes: int, invalid_column: bool, to_value):
    """Drop the invalid column (raising if it is not empty) unless the caller asked for it."""
    if invalid_column:
        return counts
    n_invalid = to_value(counts[..., num_classes].sum())
    if n_invalid:
        raise MagsegError(
            f"prediction has {n_invalid} voxels with labels outside [0, {num_classes}) where the "
            "truth is labelled; fix the prediction or use invalid_column=True to count them as "
            "errors"
        )
    return counts[..., :num_classes]


def confusion_matrix(
    pred, truth, num_classes: int, ignore: int | None = 255, *, invalid_column: bool = False
):
    """Confusion matrix of one prediction against its truth, rows = truth, columns = prediction.

    ``pred`` and ``truth`` are integer arrays of the same shape (any ndim): both numpy, or both
    torch tensors. NumPy in, ``np.ndarray[int64]`` out. Torch in, an int64 tensor on the same
    device out (built with ``torch.bincount``, so it can be all-reduced across ranks before
    :func:`scores_from_confusion`). Shape (C, C), or (C, C + 1) with ``invalid_column=True``
    (see the module docstring for out-of-range predictions).
    """
    num_classes = _check_num_classes(num_classes)
    if tuple(pred.shape) != tuple(truth.shape):
        raise MagsegError(
            f"prediction shape {tuple(pred.shape)} differs from truth shape {tuple(truth.shape)}"
        )
    if _is_torch(pred) or _is_torch(truth):
        import torch

        if not (_is_torch(pred) and _is_torch(truth)):
            raise MagsegError("confusion_matrix needs pred and truth both numpy or both torch")
        with torch.no_grad():
            counts = _confusion_torch(pred, truth, num_classes, ignore)
        return _finish(counts, num_classes, invalid_column, int)
    counts = _confusion_numpy(pred, truth, num_classes, ignore, leading=1)[0]
    return _finish(counts, num_classes, invalid_column, int)


def scores_from_confusion(cm) -> dict:
    """Dataset-level scores from a (C, C) or (C, C + 1) confusion matrix (numpy or torch).

    Returns a dict of plain Python values:
    ``iou``, ``dice`` (lists, NaN for absent classes), ``present`` (class in truth or
    prediction), ``miou`` and ``mean_dice`` (mean over present classes, NaN if none),
    ``pixel_accuracy`` (correct / labelled voxels, NaN if none), ``support`` (truth voxels per
    class), ``labelled`` (voxels counted), ``invalid_predictions`` (out-of-range predictions).
    """
    if _is_torch(cm):
        cm = cm.detach().cpu().numpy()
    cm = np.asarray(cm, dtype=np.int64)
    if cm.ndim != 2 or cm.shape[1] not in (cm.shape[0], cm.shape[0] + 1):
        raise MagsegError(f"confusion matrix must be (C, C) or (C, C+1), got {cm.shape}")
    c = cm.shape[0]
    square = cm[:, :c].astype(np.float64)
    tp = np.diag(square)
    truth_count = cm.sum(axis=1).astype(np.float64)  # includes invalid predictions (misses)
    pred_count = square.sum(axis=0)
    union = truth_count + pred_count - tp
    present = union > 0
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(present, tp / union, np.nan)
        dice = np.where(present, 2 * tp / (truth_count + pred_count), np.nan)
    total = float(cm.sum())
    return {
        "iou": [float(v) for v in iou],
        "dice": [float(v) for v in dice],
        "present": [bool(v) for v in present],
        "miou": float(np.mean(iou[present])) if present.any() else float("nan"),
        "mean_dice": float(np.mean(dice[present])) if present.any() else float("nan"),
        "pixel_accuracy": float(tp.sum() / total) if total > 0 else float("nan"),
        "support": [int(v) for v in cm.sum(axis=1)],
        "labelled": int(total),
        "invalid_predictions": int(cm[:, c:].sum()),
    }


# --- Dask: chunk by chunk, for volumes larger than memory ----------------------------------


def _as_dask(x):
    import dask.array as da

    data = getattr(x, "data", x)  # xr.DataArray -> its (dask) array
    if isinstance(data, da.Array):
        return data
    return da.asarray(np.asarray(data))


def _aligned(pred, truth):
    p, t = _as_dask(pred), _as_dask(truth)
    if p.shape != t.shape:
        raise MagsegError(f"prediction shape {p.shape} differs from truth shape {t.shape}")
    if p.ndim < 1:
        raise MagsegError("prediction and truth must have at least one dimension")
    if t.chunks != p.chunks:
        t = t.rechunk(p.chunks)
    return p, t


def _block_per_slice(p, t, num_classes, ignore):
    counts = _confusion_numpy(p, t, num_classes, ignore, leading=p.shape[0])
    # One (C, C+1) per slice along axis 0, singleton block axes for the others.
    return counts.reshape((p.shape[0],) + (1,) * (p.ndim - 1) + counts.shape[1:])


def per_slice_confusion(
    pred, truth, num_classes: int, ignore: int | None = 255, *, invalid_column: bool = False
) -> np.ndarray:
    """Confusion matrix of every slice along the first axis (z): (Z, C, C) or (Z, C, C + 1).

    ``pred`` and ``truth``: xr.DataArray, dask or numpy arrays of the same shape; computed one
    block at a time with the current Dask scheduler, so the volume never has to fit in memory.
    """
    num_classes = _check_num_classes(num_classes)
    p, t = _aligned(pred, truth)
    k = num_classes + 1
    blocks = p.map_blocks(
        _block_per_slice,
        t,
        num_classes,
        ignore,
        dtype=np.int64,
        new_axis=[p.ndim, p.ndim + 1],
        chunks=(p.chunks[0],) + tuple((1,) * len(c) for c in p.chunks[1:]) + ((num_classes,), (k,)),
        meta=np.empty((0,) * (p.ndim + 2), dtype=np.int64),
    )
    counts = blocks.sum(axis=tuple(range(1, p.ndim)), dtype=np.int64).compute()
    return _finish(counts, num_classes, invalid_column, int)


def volume_confusion(
    pred, truth, num_classes: int, ignore: int | None = 255, *, invalid_column: bool = False
) -> np.ndarray:
    """Confusion matrix of a whole volume, computed chunk by chunk (see per_slice_confusion)."""
    num_classes = _check_num_classes(num_classes)
    p, t = _aligned(pred, truth)
    k = num_classes + 1
    nd = p.ndim

    def block(a, b):
        counts = _confusion_numpy(a, b, num_classes, ignore, leading=1)[0]
        return counts.reshape((1,) * nd + counts.shape)

    blocks = p.map_blocks(
        block,
        t,
        dtype=np.int64,
        new_axis=[nd, nd + 1],
        chunks=tuple((1,) * len(c) for c in p.chunks) + ((num_classes,), (k,)),
        meta=np.empty((0,) * (nd + 2), dtype=np.int64),
    )
    counts = blocks.sum(axis=tuple(range(nd)), dtype=np.int64).compute()
    return _finish(counts, num_classes, invalid_column, int)


def miou_from_slices(slice_cms: np.ndarray) -> np.ndarray:
    """mIoU of each slice from (Z, C, C[+1]) matrices; NaN where a slice has no labelled voxel."""
    out = np.full(slice_cms.shape[0], np.nan)
    for z, cm in enumerate(slice_cms):
        if cm.sum() > 0:
            out[z] = scores_from_confusion(cm)["miou"]
    return out


def per_slice_miou(
    pred, truth, num_classes: int, ignore: int | None = 255, *, invalid_column: bool = False
) -> np.ndarray:
    """mIoU of every slice along z (float64, length Z; NaN where a slice has no labels).

    Each slice uses the same empty-class rule as the volume: classes absent from both the
    slice's truth and prediction are left out of that slice's mean.
    """
    return miou_from_slices(
        per_slice_confusion(pred, truth, num_classes, ignore, invalid_column=invalid_column)
    )
