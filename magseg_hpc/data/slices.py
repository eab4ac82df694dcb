"""2D slice datasets for training: where slices come from, and what one sample is.

Two sources of slices:

* a volume store (image + labels zarr group, e.g. from ``magseg-hpc make-phantom``); slices
  are taken along ``data.axis`` and named by their index (``MultiAxisSlices``: along several
  axes, keys like ``"y:40"``);
* an image folder in the original study's layout: ``images/{id}.png``, ``masks/{id}.png``
  (colour PNGs, colours from the class table, any other colour -> 255 ignore) and the lists
  ``labeled.txt`` / ``unlabeled.txt`` / ``val.txt`` (one id or file name per line).

Which slices are labelled, unlabelled or validation is ``splits.py``; which sample each rank
sees at each step, and its random generator, is ``sampling.py``. The unlabelled dataset
never opens the labels.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from magseg_hpc.axes import AXES
from magseg_hpc.classes import IGNORE_LABEL, ClassTable
from magseg_hpc.data.augment import strong_augment, weak_augment
from magseg_hpc.data.masks import colors_to_labels, read_mask
from magseg_hpc.data.normalize import (
    apply_normalization,
    mark_outside,
    marks_outside,
    scale_to_unit,
    standardize,
)
from magseg_hpc.data.sampling import STREAM_LABELED_AUG, STREAM_UNLABELED_AUG, sample_rng
from magseg_hpc.errors import MagsegError
from magseg_hpc.volume.io import open_volume, soft_var
from magseg_hpc.volume.support import inside_pixels, is_masked, outside_planes, support_of

log = logging.getLogger(__name__)

__all__ = [
    "VolumeSlices",
    "MultiAxisSlices",
    "FolderSlices",
    "LabeledSlices",
    "UnlabeledSlices",
    "ValSlices",
    "AugmentSettings",
]

IMAGE_SUFFIXES = (".png", ".tif", ".tiff", ".jpg", ".jpeg", ".bmp")

# --- sources ---------------------------------------------------------------------------------


class VolumeSlices:
    """2D slices of a volume store along ``axis``. Opens the labels only when asked for them.

    Volumes up to ``cache_mb`` are read into memory once (per process, on first use); larger
    ones are read slice by slice through dask.
    """

    def __init__(self, path: str | Path, axis: str = "z", *, image_var: str = "image",
                 label_var: str = "labels", label_path: str | Path | None = None,
                 cache_mb: int = 1024):
        if axis not in AXES:
            raise MagsegError(f"data.axis must be one of {AXES}, got {axis!r}")
        self.path, self.axis = str(path), axis
        self.label_path = str(label_path) if label_path else self.path
        self.image_var, self.label_var = image_var, label_var
        self.cache_bytes = int(cache_mb) * 2**20
        self.axis_index = AXES.index(axis)
        self._image = None
        self._labels = None
        self._cache: dict[str, np.ndarray] = {}
        self._outside: dict[str, np.ndarray] = {}  # packed bits, by plane (read_outside)
        self._lock = threading.Lock()
        self._image_array()  # fail early on a bad path

    def _image_array(self):
        if self._image is None:
            self._image = open_volume(self.path, **soft_var(self.image_var, "image"))
        return self._image

    def __len__(self) -> int:
        return int(self._image_array().shape[self.axis_index])

    @property
    def slice_shape(self) -> tuple[int, int]:
        shape = list(self._image_array().shape)
        del shape[self.axis_index]
        return tuple(shape)  # type: ignore[return-value]

    def image_volume(self):
        """The image volume as a dask-backed DataArray (for fitting the normalisation)."""
        return self._image_array()

    def _labels_array(self):
        if self._labels is None:
            # A separate label volume may be a plain array; labels inside the image store
            # must be named (its only array is the image).
            kw = (soft_var(self.label_var, "labels") if self.label_path != self.path
                  else {"var": self.label_var})
            try:
                self._labels = open_volume(self.label_path, **kw)
            except MagsegError as e:
                raise MagsegError(
                    f"{self.label_path}: no label volume {self.label_var!r} for the labelled/"
                    f"validation slices ({e}); set data.label_var or data.label_volume"
                ) from None
            image_shape = tuple(self._image_array().shape)
            if tuple(self._labels.shape) != image_shape:
                raise MagsegError(
                    f"{self.label_path}: labels shape {tuple(self._labels.shape)} differs from "
                    f"the image shape {image_shape} of {self.path}"
                )
        return self._labels

    def labelled_slices(self) -> list[int] | None:
        """Indices of the slices along ``axis`` that carry labels (any voxel not 255), or
        None when every slice does (a dense label volume). Streams the labels through dask."""
        import dask

        labels = self._labels_array()
        others = [d for d in AXES if d != self.axis]
        with dask.config.set(scheduler="threads"):
            carries = np.asarray((labels != IGNORE_LABEL).any(dim=others).values)
        return None if carries.all() else np.flatnonzero(carries).tolist()

    def check_label_values(self, classes: ClassTable) -> None:
        """Refuse a label outside the class table (its classes, or 255 unlabelled) in one line
        naming the first slice along ``axis`` that holds one, and the value: the loss and the
        scores would index past the table. Streams the labels."""
        import dask

        labels = self._labels_array()
        bad = ((labels < 0) | (labels >= classes.num_classes)) & (labels != IGNORE_LABEL)
        with dask.config.set(scheduler="threads"):
            where = np.flatnonzero(np.asarray(
                bad.any(dim=[d for d in AXES if d != self.axis]).values))
        if not where.size:
            return
        plane = np.asarray(labels.isel({self.axis: int(where[0])}).values)
        values = np.unique(plane[np.asarray(bad.isel({self.axis: int(where[0])}).values)])
        shown = ", ".join(f"{v:g}" for v in values[:5]) + (" ..." if values.size > 5 else "")
        raise MagsegError(
            f"{self.label_path}: {self.axis} slice {int(where[0])} holds the label value(s) "
            f"{shown}, outside the class table (0..{classes.num_classes - 1}: "
            f"{', '.join(classes.names)}; {IGNORE_LABEL} unlabelled)"
            + (f", as do {where.size - 1} more slice(s)" if where.size > 1 else "")
            + "; fix the labels, or the config's class_table")

    def _read(self, name: str, arr, index: int) -> np.ndarray:
        if not 0 <= index < len(self):
            raise MagsegError(
                f"{self.path}: slice {index} along {self.axis} is out of range 0..{len(self) - 1}; "
                "check the split files"
            )
        if arr.nbytes <= self.cache_bytes:
            with self._lock:
                if name not in self._cache:
                    self._cache[name] = np.asarray(arr.values)
            return np.take(self._cache[name], index, axis=self.axis_index)
        return np.asarray(arr.isel({self.axis: index}).values)

    def _context(self, key: str, context: int) -> list[int]:
        """The slice indices of ``key`` with ``context`` > 1 neighbours, the end slices
        repeated at the volume's faces."""
        index, half = int(key), context // 2
        return np.clip(np.arange(index - half, index + half + 1), 0, len(self) - 1).tolist()

    def read_image(self, key: str, context: int = 1) -> np.ndarray:
        """Slice ``key`` (H, W), or with ``context`` > 1 the slice and its neighbours
        (context, H, W), repeating the end slices at the volume's faces."""
        if context == 1:
            return self._read("image", self._image_array(), int(key)).astype(np.float32,
                                                                               copy=False)
        return np.stack([self._read("image", self._image_array(), i)
                         for i in self._context(key, context)]).astype(np.float32, copy=False)

    def read_outside(self, key: str, context: int, support: dict) -> np.ndarray:
        """``support.outside_planes`` of ``read_image(key, context)``; each plane's is
        computed once per process when the volume is held in memory (training reads every
        slice many times)."""
        planes = []
        for i in ([int(key)] if context == 1 else self._context(key, context)):
            name = f"outside:{support.get('outside')}:{support.get('value')}:{i}"
            plane = self._outside.get(name)
            if plane is None:
                plane = outside_planes(self._read("image", self._image_array(), i), support)
                if self._image_array().nbytes <= self.cache_bytes:
                    self._outside[name] = np.packbits(plane)
            else:
                plane = np.unpackbits(plane, count=math.prod(self.slice_shape)).reshape(
                    self.slice_shape).astype(bool)
            planes.append(plane)
        return planes[0] if context == 1 else np.stack(planes)

    def read_labels(self, key: str) -> np.ndarray:
        labels = self._read("labels", self._labels_array(), int(key))
        return labels.astype(np.uint8, copy=False)

    def __getstate__(self):
        # DataLoader workers (spawned) reopen the store by path instead of unpickling arrays
        state = self.__dict__.copy()
        state["_image"], state["_labels"], state["_cache"], state["_lock"] = None, None, {}, None
        state["_outside"] = {}
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()


class MultiAxisSlices:
    """One volume sliced along several axes (``data.axes``), so that a model used for
    orthoplane fusion has seen every plane.

    Keys: ``"12"`` is slice 12 along the primary axis (``data.axis``, as split files always
    held), ``"y:40"`` slice 40 along y. A slice along another axis crosses the labelled
    primary slices in lines: those lines carry their labels, every other pixel is 255.
    """

    def __init__(self, primary: VolumeSlices, axes: Sequence[str], labeled_primary: Sequence):
        self.primary, self.axis = primary, primary.axis
        self.by_axis = {primary.axis: primary}
        for axis in axes:
            if axis not in self.by_axis:
                other = VolumeSlices(primary.path, axis, image_var=primary.image_var,
                                     label_var=primary.label_var, label_path=primary.label_path,
                                     cache_mb=primary.cache_bytes // 2**20)
                other._cache, other._lock = primary._cache, primary._lock  # one copy in memory
                self.by_axis[axis] = other
        self.labeled = sorted(int(k) for k in labeled_primary)

    def __len__(self) -> int:
        return len(self.primary)

    def image_volume(self):
        return self.primary.image_volume()

    def _split(self, key: str) -> tuple[str, str]:
        axis, _, index = str(key).rpartition(":")
        return axis or self.axis, index

    def read_image(self, key: str, context: int = 1) -> np.ndarray:
        axis, index = self._split(key)
        return self.by_axis[axis].read_image(index, context)

    def read_outside(self, key: str, context: int, support: dict) -> np.ndarray:
        axis, index = self._split(key)
        return self.by_axis[axis].read_outside(index, context, support)

    def read_labels(self, key: str) -> np.ndarray:
        axis, index = self._split(key)
        labels = self.by_axis[axis].read_labels(index)
        if axis == self.axis:
            return labels
        pos = [a for a in AXES if a != axis].index(self.axis)  # primary axis in this slice
        keep = np.zeros(labels.shape[pos], bool)
        keep[self.labeled] = True
        out = np.full_like(labels, IGNORE_LABEL)
        where = (keep, slice(None)) if pos == 0 else (slice(None), keep)
        out[where] = labels[where]
        return out


class FolderSlices:
    """Images and colour masks in the original study's folder layout."""

    def __init__(self, root: str | Path, class_table: ClassTable, *, image_dir: str = "images",
                 mask_dir: str = "masks"):
        self.root = Path(root)
        self.image_dir, self.mask_dir = self.root / image_dir, self.root / mask_dir
        self.class_table = class_table
        if not self.image_dir.is_dir():
            raise MagsegError(
                f"{self.image_dir}: no image folder; data.folder must hold {image_dir}/ "
                f"(and {mask_dir}/ with colour masks, labeled.txt, unlabeled.txt, val.txt)"
            )

    @staticmethod
    def _find(folder: Path, key: str) -> Path:
        direct = folder / key
        if direct.suffix.lower() in IMAGE_SUFFIXES and direct.is_file():
            return direct
        stem = Path(key).stem if Path(key).suffix.lower() in IMAGE_SUFFIXES else key
        for suffix in IMAGE_SUFFIXES:
            p = folder / f"{stem}{suffix}"
            if p.is_file():
                return p
        raise MagsegError(f"{folder}: no image named {key!r} (looked for {stem}.png etc.)")

    def read_image(self, key: str, context: int = 1) -> np.ndarray:
        from PIL import Image

        if context != 1:
            raise MagsegError("model.context_slices > 1 needs a volume (data.volume): the "
                              "images of data.folder have no neighbouring slices")
        with Image.open(self._find(self.image_dir, key)) as im:
            arr = np.asarray(im)
        if arr.ndim == 3:  # the study stored grey images replicated to RGB
            arr = arr[..., 0]
        return arr.astype(np.float32)

    def read_outside(self, key: str, context: int, support: dict) -> np.ndarray:
        return outside_planes(self.read_image(key, context), support)

    def read_labels(self, key: str) -> np.ndarray:
        # Colours not in the class table become 255 (the study mapped them to class 0).
        rgb = read_mask(self._find(self.mask_dir, key))
        return colors_to_labels(rgb, self.class_table)

    def normalization_sample(self, keys: Sequence[str], max_images: int = 64) -> np.ndarray:
        """A stack of up to ``max_images`` evenly spread images (for fit_normalization and
        the support decision); their pixels in a row when their shapes differ."""
        if not keys:
            raise MagsegError(f"{self.root}: no training images to fit the normalisation")
        idx = np.unique(np.linspace(0, len(keys) - 1, min(max_images, len(keys))).astype(int))
        images = [self.read_image(keys[i]) for i in idx]
        if len({im.shape for im in images}) == 1:
            return np.stack(images)
        return np.concatenate([im.ravel() for im in images])


# --- datasets --------------------------------------------------------------------------------


@dataclass(frozen=True)
class AugmentSettings:
    crop_size: int
    scale_range: tuple[float, float] = (0.5, 2.0)
    vflip: bool = False
    rot90: bool = False
    num_strong_augs: int = 3
    random_num_augs: bool = True
    strong_ops: tuple[str, ...] | None = None  # None: the study's pool
    context: int = 1  # model.context_slices: neighbouring slices as channels
    foreground: float = 0.0  # share of crops placed on the sample (train.foreground_crop)


class LabeledSlices(Dataset):
    """Weak-augmented labelled crops: item ``(epoch, position, index)`` ->
    (image float32 (1, h, w) standardised, labels int64 (h, w) with 255 = ignore)."""

    stream = STREAM_LABELED_AUG

    def __init__(self, source, keys: Sequence[str], normalization: dict, aug: AugmentSettings,
                 seed: int):
        self.source, self.keys = source, list(keys)
        self.norm, self.aug, self.seed = dict(normalization), aug, int(seed)

    def __len__(self) -> int:
        return len(self.keys)

    def _weak(self, image01, mask, rng, focus=None):
        return weak_augment(
            image01, mask, crop_size=self.aug.crop_size, generator=rng,
            scale_range=self.aug.scale_range, vflip=self.aug.vflip, rot90=self.aug.rot90,
            pad_value=self.norm["mean"],  # standardises to 0, as AugSeg's mean padding
            focus=focus, focus_prob=self.aug.foreground,
        )

    def _read(self, key):
        """(raw image (H, W) or (context, H, W), its values in [0, 1], the outside of a
        masked sample marked when the normalisation says so)."""
        raw = self.source.read_image(key, self.aug.context)
        x01 = scale_to_unit(raw, self.norm)
        if marks_outside(self.norm):
            x01 = mark_outside(x01, self.source.read_outside(key, self.aug.context,
                                                             support_of(self.norm)))
        return raw, x01

    def __getitem__(self, item):
        epoch, position, index = item
        key = self.keys[index]
        rng = sample_rng(self.seed, self.stream, epoch, position)
        _, image01 = self._read(key)
        mask = self.source.read_labels(key)
        # the sample: labelled pixels other than background
        focus = (mask != 0) & (mask != IGNORE_LABEL) if self.aug.foreground else None
        image, labels = self._weak(image01, mask, rng, focus)
        return _channels(standardize(image, self.norm)), labels


class UnlabeledSlices(LabeledSlices):
    """Unlabelled crops: item -> (weak view (1, h, w), strong view (1, h, w), valid (h, w)).

    Both views are standardised; the strong one is the weak one plus intensity operations,
    so they stay pixel-aligned. ``valid`` is False on crop padding (left out of L_uns). The
    labels of these slices are never opened.
    """

    stream = STREAM_UNLABELED_AUG

    def __getitem__(self, item):
        epoch, position, index = item
        key = self.keys[index]
        rng = sample_rng(self.seed, self.stream, epoch, position)
        raw, image01 = self._read(key)
        centre = raw if raw.ndim == 2 else raw[len(raw) // 2]
        # no labels here: on a masked reconstruction the sample is what is not masked
        support = support_of(self.norm)
        focus = (inside_pixels(centre, support)
                 if self.aug.foreground and is_masked(support) else None)
        weak, pad = self._weak(image01, np.zeros(centre.shape, np.uint8), rng, focus)
        strong = weak.clone()
        if self.aug.num_strong_augs > 0:
            # the intensity operations work in [0, 1]; a marked outside (< 0) stays as it was
            strong = strong_augment(weak.clamp(0, 1), rng, num_ops=self.aug.num_strong_augs,
                                    random_num_ops=self.aug.random_num_augs,
                                    pool=self.aug.strong_ops)
            strong = torch.where(weak < 0, weak, strong)
        return (_channels(standardize(weak, self.norm)),
                _channels(standardize(strong, self.norm)), pad != IGNORE_LABEL)


class ValSlices(Dataset):
    """Whole validation slices, no augmentation: index -> (image (1, H, W), labels (H, W))."""

    def __init__(self, source, keys: Sequence[str], normalization: dict, context: int = 1):
        self.source, self.keys, self.norm = source, list(keys), dict(normalization)
        self.context = context

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, index: int):
        key = self.keys[index]
        outside = (self.source.read_outside(key, self.context, support_of(self.norm))
                   if marks_outside(self.norm) else None)
        image = apply_normalization(self.source.read_image(key, self.context), self.norm,
                                    outside)
        labels = self.source.read_labels(key).astype(np.int64)
        return _channels(torch.from_numpy(np.ascontiguousarray(image))), torch.from_numpy(labels)


def _channels(image: torch.Tensor) -> torch.Tensor:
    """(H, W) -> (1, H, W); (context, H, W) stays."""
    return image[None] if image.ndim == 2 else image
