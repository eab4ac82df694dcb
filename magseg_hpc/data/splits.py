"""Which slices train with labels, which without, which validate: the splits of a run.

Splits are plain text files (one slice index or image id per line, ``#`` comments) written
to ``RUN/splits/`` when a run starts and reused when it resumes.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from magseg_hpc.axes import AXES
from magseg_hpc.data.sampling import STREAM_SPLIT
from magseg_hpc.data.slices import IMAGE_SUFFIXES, MultiAxisSlices, VolumeSlices
from magseg_hpc.errors import MagsegError
from magseg_hpc.paths import atomic_write

SPLIT_NAMES = ("labeled", "unlabeled", "val")


def _even(indices: Sequence[int], n: int) -> list[int]:
    """``n`` of ``indices`` spread evenly, ends included."""
    if n >= len(indices):
        return list(indices)
    pos = np.round(np.linspace(0, len(indices) - 1, n)).astype(int)
    return [indices[i] for i in pos]


def make_splits(
    n_slices: int,
    *,
    n_labeled: int,
    n_val: int = 0,
    labeled_selection: str = "even",
    val_selection: str = "block",
    seed: int = 0,
    n_val_slices: int | None = None,
    labelled: Sequence[int] | None = None,
    val_labelled: Sequence[int] | None = None,
) -> dict[str, list[int]]:
    """Split the slice indices ``0..n_slices-1`` of a training volume.

    Validation: with ``n_val_slices`` (the depth of a separate validation volume), ``n_val``
    evenly spread slices of that volume (all of them when ``n_val`` is 0); otherwise
    ``n_val`` slices held out of the training volume, as a contiguous block at the end of
    the axis (``block``) or evenly spread (``even``). Of the remaining slices ``n_labeled``
    are labelled (evenly spread, or a seeded random choice) and the rest unlabelled.

    Sparse labels: ``labelled`` lists the slices of the training volume that carry labels
    (``val_labelled`` those of the validation volume). Then every one of them is labelled and
    ``n_labeled`` is not used; validation is ``n_val`` of the labelled slices held out (the
    last ones for ``block``, evenly spread for ``even``) or, with a validation volume, its
    labelled slices (``n_val`` of them evenly spread, all when 0).
    """
    if n_slices < 1:
        raise MagsegError("the training volume has no slices along data.axis")
    if labelled is not None:
        return _sparse_splits(n_slices, labelled, n_val, val_selection, n_val_slices,
                              val_labelled)
    all_idx = list(range(n_slices))
    if n_val_slices is not None:
        pool = list(range(n_val_slices)) if val_labelled is None else list(val_labelled)
        if not pool:
            raise MagsegError("the validation label volume (data.val_volume) carries no labels")
        val = pool if n_val == 0 else _even(pool, n_val)
        rest = all_idx
    else:
        if n_val >= n_slices:
            raise MagsegError(
                f"data.n_val={n_val} leaves no training slices of {n_slices}; lower it or give "
                "data.val_volume"
            )
        if val_selection == "block":
            val = all_idx[n_slices - n_val:]
        elif val_selection == "even":
            val = _even(all_idx, n_val)
        else:
            raise MagsegError(f"data.val_selection must be block or even, got {val_selection!r}")
        held = set(val)
        rest = [i for i in all_idx if i not in held]
    if n_labeled > len(rest):
        raise MagsegError(
            f"data.n_labeled={n_labeled} but only {len(rest)} training slices remain "
            f"(of {n_slices}, {len(all_idx) - len(rest)} held out for validation); lower it"
        )
    if labeled_selection == "even":
        labeled = _even(rest, n_labeled)
    elif labeled_selection == "random":
        rng = np.random.default_rng([seed, STREAM_SPLIT])
        labeled = sorted(rng.choice(rest, size=n_labeled, replace=False).tolist())
    else:
        raise MagsegError(
            f"data.labeled_selection must be even or random, got {labeled_selection!r}"
        )
    chosen = set(labeled)
    unlabeled = [i for i in rest if i not in chosen]
    return {"labeled": labeled, "unlabeled": unlabeled, "val": val}


def _sparse_splits(n_slices: int, labelled: Sequence[int], n_val: int,
                   val_selection: str, n_val_slices: int | None,
                   val_labelled: Sequence[int] | None) -> dict[str, list[int]]:
    """``make_splits`` for label volumes whose labels cover only some slices."""
    labelled = sorted(int(i) for i in labelled)
    if not labelled:
        raise MagsegError(
            "the label volume carries no labels (every voxel is 255, unlabelled); import "
            "masks of a few slices with `magseg-hpc import-masks --like VOLUME`"
        )
    if n_val_slices is not None:
        val = make_splits(n_val_slices, n_labeled=1, n_val=n_val, n_val_slices=n_val_slices,
                          val_labelled=val_labelled)["val"]
    elif val_selection not in ("block", "even"):
        raise MagsegError(f"data.val_selection must be block or even, got {val_selection!r}")
    else:
        if n_val >= len(labelled):
            raise MagsegError(
                f"only {len(labelled)} slices carry labels and data.n_val={n_val} of them are "
                "held out for validation, leaving none to train on; label more slices, lower "
                "data.n_val or give a separate data.val_volume"
            )
        val = (labelled[len(labelled) - n_val:] if val_selection == "block"
               else _even(labelled, n_val)) if n_val else []
        labelled = [i for i in labelled if i not in set(val)]
    held = set(labelled) | (set(val) if n_val_slices is None else set())
    unlabeled = [i for i in range(n_slices) if i not in held]
    return {"labeled": labelled, "unlabeled": unlabeled, "val": val}


def sparse_label_slices(d) -> dict:
    """``make_splits`` keywords for a config's ``data`` section: the slices that carry labels
    in the training (and validation) label volume, None where every slice does."""
    kw = {"image_var": d.image_var, "label_var": d.label_var, "cache_mb": 0}
    found = {"labelled": VolumeSlices(d.volume, d.axis, label_path=d.label_volume,
                                      **kw).labelled_slices()}
    if d.val_volume:
        found["val_labelled"] = VolumeSlices(d.val_volume, d.axis,
                                             label_path=d.val_label_volume,
                                             **kw).labelled_slices()
    return found


def check_label_values(cfg) -> None:
    """Refuse labels outside the class table in the training and validation label volumes
    (``VolumeSlices.check_label_values``), before a run folder is made. ``cfg``: an
    ExperimentConfig; an image folder's masks are mapped through the table when read."""
    d = cfg.data
    if not d.volume:
        return
    kw = {"image_var": d.image_var, "label_var": d.label_var, "cache_mb": 0}
    pairs = [(d.volume, d.label_volume)] + ([(d.val_volume, d.val_label_volume)]
                                            if d.val_volume else [])
    for volume, labels in pairs:
        VolumeSlices(volume, d.axis, label_path=labels, **kw).check_label_values(cfg.class_table)


def write_split(path: str | Path, keys: Sequence, header: str = "") -> None:
    """One key per line, after ``#`` header lines; written atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [f"# {line}" for line in header.splitlines() if line] + [str(k) for k in keys]
    atomic_write(path, "\n".join(lines) + "\n")


def read_split(path: str | Path) -> list[str]:
    """Keys of a split file: the first whitespace-separated field of each non-comment line.

    The study's lists sometimes hold "image_path mask_path" pairs; the id is the image
    file's stem in that case.
    """
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise MagsegError(f"cannot read split file {path}: {e.strerror}") from None
    keys = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key = Path(line.split()[0])
        keys.append(key.stem if key.suffix.lower() in IMAGE_SUFFIXES else key.name)
    return keys


def check_split_indices(splits: dict[str, list[str]], files: dict[str, str | None],
                        n_slices: int, n_val_slices: int | None, axis: str) -> None:
    """The entries of a volume's split files are slice indices along ``axis``: one that is
    not an integer in range (100 of 8 slices, -1, abc) is refused in one line naming the
    config key, the file and the entry, before anything trains on a wrong slice."""
    for name, keys in splits.items():
        n = n_val_slices if name == "val" and n_val_slices is not None else n_slices
        for key in keys:
            try:
                ok = 0 <= int(key) < n
            except ValueError:
                ok = False
            if not ok:
                raise MagsegError(
                    f"data.{name}_split {files[name]}: {key!r} is not a slice index in "
                    f"0..{n - 1} along {axis}; list one index a line")


def other_axis_keys(primary: VolumeSlices | MultiAxisSlices, axes: Sequence[str],
                    n_labeled: int) -> tuple[list[str], list[str]]:
    """(labelled, unlabelled) keys along the axes other than the primary one: every slice is
    unlabelled; ``n_labeled`` evenly spread slices per axis are labelled (each carries the
    lines where it crosses the labelled primary slices), so each axis has as many labelled
    slices as the primary one."""
    labeled, unlabeled = [], []
    shape = tuple(primary.image_volume().shape)
    for axis in axes:
        if axis == primary.axis:
            continue
        n = shape[AXES.index(axis)]
        unlabeled += [f"{axis}:{i}" for i in range(n)]
        labeled += [f"{axis}:{i}" for i in _even(list(range(n)), n_labeled)]
    return labeled, unlabeled
