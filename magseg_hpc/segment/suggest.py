"""suggest-slices: which slices to label next, by the model's uncertainty inside the sample.

The volume streams through the segment-volume pipeline (same slab plan, workers, model cache
and checks) into a scratch label store with class probabilities next to the output; per-slice
scores are then one Dask reduction over that store, and the scratch is deleted. Memory stays
bounded by the slabs in flight, as for segment-volume; the scratch costs C + 1 bytes a voxel
of disk.

Score of a slice: the mean over its predicted non-background pixels (the sample) of the
normalised entropy ``H(p) / log C`` (or ``1 - (p1 - p2)``, one minus the margin between the
two most likely classes). Slices with almost no sample are not candidates. Picks are greedy
by score with a minimum gap along the axis to each other and to already labelled slices,
so suggestions spread out; the gap is relaxed only when too few slices are left. When the
model finds the sample in too few slices (a weak first model), the rest are ranked by the
mean uncertainty over whole slices, with a warning.
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from magseg_hpc.axes import AXES
from magseg_hpc.classes import IGNORE_LABEL
from magseg_hpc.errors import MagsegError
from magseg_hpc.segment.pipeline import prepare, segment_volume
from magseg_hpc.volume.store import open_group, open_labels

log = logging.getLogger(__name__)

SCORES = ("entropy", "margin")
MIN_SAMPLE_FRACTION = 0.01  # a candidate slice shows at least this much predicted sample


@dataclass
class Suggestion:
    axis: str
    indices: list[int]  # in pick order (best first)
    scores: list[float]
    min_gap: int
    slice_scores: np.ndarray  # every slice's score (NaN: not a candidate)


def slice_scores(store: str | Path, axis: str,
                 score: str = "entropy") -> tuple[np.ndarray, np.ndarray]:
    """Per-slice mean uncertainty over predicted non-background pixels (NaN when a slice
    shows less than MIN_SAMPLE_FRACTION of sample), and over all its pixels. Reads the store
    chunk by chunk."""
    import dask
    import dask.array as da

    group = open_group(store)
    probs = da.from_zarr(group["probabilities"])
    c = probs.shape[0]
    probs = probs.rechunk({0: c}).astype(np.float32) / 255.0
    probs = probs / da.maximum(probs.sum(axis=0, keepdims=True), 1e-6)
    if score == "entropy":
        u = -(probs * da.log(da.maximum(probs, 1e-12))).sum(axis=0) / np.log(c)
    else:
        top = da.map_blocks(lambda b: np.sort(b, axis=0)[-2:], probs, dtype=np.float32,
                            chunks=((2,), *probs.chunks[1:]))
        u = 1.0 - (top[1] - top[0])
    inside = da.from_zarr(group["labels"]) != 0  # class 0: outside the sample
    others = tuple(k for k in range(3) if k != AXES.index(axis))
    with dask.config.set(scheduler="threads"):
        total, count, whole = dask.compute((u * inside).sum(axis=others),
                                           inside.sum(axis=others), u.sum(axis=others))
    area = np.prod([probs.shape[1 + k] for k in others])
    out = np.full(total.shape, np.nan)
    ok = count >= max(1, MIN_SAMPLE_FRACTION * area)
    out[ok] = total[ok] / count[ok]
    return out, whole / area


def pick_spread(scores: np.ndarray, n: int, *, exclude=(), min_gap: int = 1) -> list[int]:
    """Greedy: best scores first, at least ``min_gap`` slices from every pick and every
    ``exclude``d slice; when that leaves fewer than ``n``, the best of the rest (not
    excluded) fill up."""
    order = [int(i) for i in np.argsort(-np.nan_to_num(scores, nan=-np.inf), kind="stable")
             if np.isfinite(scores[i])]
    excluded = set(int(i) for i in exclude)
    taken: list[int] = []
    for i in order:
        if len(taken) == n:
            break
        if i not in excluded and all(abs(i - j) >= min_gap for j in [*taken, *excluded]):
            taken.append(i)
    for i in order:
        if len(taken) == n:
            break
        if i not in excluded and i not in taken:
            taken.append(i)
    return taken


def labelled_along(labels_path: str, axis: str, shape: tuple) -> list[int]:
    """Slices along ``axis`` of a label volume that carry labels (any voxel not 255)."""
    import dask

    labels, _ = open_labels(labels_path)
    if tuple(labels.shape) != tuple(shape):
        raise MagsegError(f"{labels_path}: labels have shape {tuple(labels.shape)} but the "
                          f"volume has {tuple(shape)}; give the labels of this volume")
    others = [d for d in AXES if d != axis]
    with dask.config.set(scheduler="threads"):
        carries = np.asarray((labels != IGNORE_LABEL).any(dim=others).values)
    return np.flatnonzero(carries).tolist()


@dataclass
class SuggestPlan:
    prepared: object  # pipeline.Prepared for the scratch store
    axis: str
    n: int
    score: str
    labelled: list[int]
    min_gap: int


def plan_suggestions(opts, *, n: int, score: str = "entropy", labels: str | None = None,
                     min_gap: int | None = None,
                     scratch_dir: str | Path | None = None) -> SuggestPlan:
    """Check everything (volume, model, labels, n) and plan; writes nothing. ``opts`` is a
    ``SegmentOptions`` with one axis; its ``output`` is replaced by a scratch store."""
    from dataclasses import replace

    if score not in SCORES:
        raise MagsegError(f"--score {score}: choose one of {', '.join(SCORES)}")
    if n < 1:
        raise MagsegError(f"--n {n}: ask for at least one slice")
    if len(opts.axes) != 1 or opts.axes[0] not in AXES:
        raise MagsegError("suggest-slices scores the slices of one axis: z, y or x")
    if min_gap is not None and min_gap < 1:
        raise MagsegError(f"--min-gap {min_gap}: give a positive number of slices")
    axis = opts.axes[0]
    scratch = Path(scratch_dir or ".") / f".magseg-suggest-{time.time_ns()}.zarr"
    opts = replace(opts, output=str(scratch), probabilities=True, method="model",
                   resume=False, overwrite=False)
    prepared = prepare(opts)
    shape = tuple(int(s) for s in prepared.volume.shape)
    size = shape[AXES.index(axis)]
    done = labelled_along(labels, axis, shape) if labels else []
    if n > size - len(done):
        raise MagsegError(f"--n {n}: only {size - len(done)} of {size} {axis} slices are not "
                          "labelled")
    if min_gap is None:
        min_gap = max(1, int(size / (2 * (n + len(done)))))
    return SuggestPlan(prepared, axis, n, score, done, min_gap)


def suggest_slices(plan: SuggestPlan, client, *, torch_threads: int | None = None,
                   progress: bool | None = None) -> Suggestion:
    """Segment with probabilities on ``client``'s cluster (``torch_threads`` a task, as
    ``segment_volume``), score the slices, pick."""
    scratch = plan.prepared.job.output
    try:
        segment_volume(plan.prepared, client, torch_threads=torch_threads, progress=progress)
        scores, whole = slice_scores(scratch, plan.axis, plan.score)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    picked = pick_spread(scores, plan.n, exclude=plan.labelled, min_gap=plan.min_gap)
    values = [float(scores[i]) for i in picked]
    if len(picked) < plan.n:
        # A weak first model may find (almost) no sample: rank the rest by whole slices.
        log.warning("the model finds the sample in only %d unlabelled %s slices; the other "
                    "%d suggestions are ranked by the uncertainty of whole slices",
                    len(picked), plan.axis, plan.n - len(picked))
        more = pick_spread(whole, plan.n - len(picked), exclude=[*plan.labelled, *picked],
                           min_gap=plan.min_gap)
        picked, values = picked + more, values + [float(whole[i]) for i in more]
    return Suggestion(plan.axis, picked, values, plan.min_gap, scores)
