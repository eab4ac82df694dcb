"""Preview pictures: one slice of a volume, optionally with labels in the display palette."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

from magseg_hpc.axes import AXES
from magseg_hpc.classes import IGNORE_LABEL, ClassTable
from magseg_hpc.errors import MagsegError
from magseg_hpc.volume.io import open_volume, reading
from magseg_hpc.volume.store import open_labels
from magseg_hpc.volume.support import display_window, resolve_support

log = logging.getLogger(__name__)

DPI = 100
HEADER_PX = 70  # title (two lines) and the legend row above the slice
MARGIN_PX = (55, 15, 45)  # left, right, bottom: axis ticks and labels


def select_slice(axis: str | None = None, index: int | None = None) -> tuple[str, int | None]:
    if axis is None:
        return "z", None  # middle z
    if axis not in AXES:
        raise MagsegError(f"axis must be one of {', '.join(AXES)}, got {axis!r}")
    return axis, index


def _resolve_index(axis: str, index: int | None, size: int) -> int:
    if index is None:
        return size // 2
    if not 0 <= index < size:
        raise MagsegError(
            f"--{axis} {index} is out of range; the volume has {axis} = 0..{size - 1}"
        )
    return int(index)


def preview_size(slice_shape: tuple[int, int], width_px: int) -> tuple[int, int]:
    """Pixel (width, height) of a preview of a slice of ``slice_shape`` (rows, cols)."""
    rows, cols = slice_shape
    aspect = min(max(rows / max(cols, 1), 0.25), 4.0)
    plot_width = width_px - MARGIN_PX[0] - MARGIN_PX[1]
    return int(width_px), int(round(plot_width * aspect)) + HEADER_PX + MARGIN_PX[2]


def render_preview(
    path: str | os.PathLike,
    out: str | os.PathLike,
    *,
    axis: str = "z",
    index: int | None = None,
    var: str | None = None,
    labels: str | os.PathLike | None = None,
    labels_var: str = "labels",
    alpha: float = 0.4,
    percentiles: tuple[float, float] = (1.0, 99.5),
    width_px: int = 800,
) -> dict:
    """Render one slice of the volume at ``path`` to the PNG ``out``.

    ``axis``/``index`` choose the slice (default the middle z slice). Intensities are shown
    in grey, clipped to the given percentiles of the slice. With ``labels`` (a label store or
    any store with a ``labels`` variable, of the same shape) the classes are overlaid in the
    display palette (classes.DISPLAY_COLORS) with a legend; ignore (255) pixels stay
    uncoloured. Returns a summary
    (axis, index, shape of the picture in pixels).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out)
    if out.suffix.lower() != ".png":
        raise MagsegError(f"{out}: preview output must be a .png file")
    if out.exists() and out.is_dir():
        raise MagsegError(f"{out}: is a folder; give a file name ending in .png")
    axis, index = select_slice(axis, index)
    volume = open_volume(path, var=var)
    sizes = dict(zip(AXES, volume.shape, strict=True))
    index = _resolve_index(axis, index, sizes[axis])

    label_slice, class_table = (None, None) if labels is None else _label_slice(
        labels, labels_var, tuple(volume.shape), axis, index)
    with reading(path):
        image = np.asarray(volume.isel({axis: index}).values, dtype=np.float64)
        support = resolve_support(volume)
    try:  # the sample's window, the outside left out; signed data about 0
        lo, hi, _ = display_window(image, support, percentiles)
    except MagsegError:  # a slice of nothing but the outside
        lo, hi = 0.0, 1.0

    width, height = preview_size(image.shape, width_px)
    fig = plt.figure(figsize=(width / DPI, height / DPI), dpi=DPI)
    try:
        left, right, bottom = MARGIN_PX
        ax = fig.add_axes(
            (left / width, bottom / height, 1 - (left + right) / width,
             1 - (HEADER_PX + bottom) / height)
        )
        ax.imshow(image, cmap="gray", vmin=lo, vmax=hi, interpolation="nearest")
        rows_dim, cols_dim = [d for d in AXES if d != axis]
        ax.set_xlabel(cols_dim)
        ax.set_ylabel(rows_dim)
        if label_slice is not None and class_table is not None:
            _overlay(fig, ax, label_slice, class_table, alpha, height)
        name = f"{path}" + (f" [{var}]" if var else "")
        fig.suptitle(
            f"{name}\n{axis} = {index} (of 0..{sizes[axis] - 1}), "
            f"intensity {lo:.3g}..{hi:.3g}",
            fontsize=9,
            y=1.0 - 4 / height,
            va="top",
        )
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, dpi=DPI)
    finally:
        plt.close(fig)
    log.debug("wrote %s (%s = %d)", out, axis, index)
    return {"axis": axis, "index": index, "size_px": (width, height), "path": str(out)}


def _label_slice(labels: str | os.PathLike, var: str, shape: tuple, axis: str,
                 index: int) -> tuple[np.ndarray, ClassTable]:
    """The slice of the label store ``labels`` (of the volume's ``shape``) and its classes."""
    label_volume, class_table = open_labels(labels, var=var)
    if tuple(label_volume.shape) != shape:
        raise MagsegError(
            f"{labels}: labels have shape {tuple(label_volume.shape)} but the volume has "
            f"{shape}; give labels made for this volume"
        )
    with reading(labels):
        return np.asarray(label_volume.isel({axis: index}).values), class_table


def _overlay(fig, ax, label_slice: np.ndarray, class_table: ClassTable, alpha: float,
             height: int) -> None:
    """The classes over the image in the display palette, with a one-row legend in the header
    (so it never hides voxels); ignore (255) pixels stay uncoloured."""
    from matplotlib.patches import Patch

    overlay = np.zeros((*label_slice.shape, 4), dtype=np.float32)
    handles = []
    for value, (name, color) in enumerate(class_table.legend(unlabelled=False)):
        overlay[label_slice == value] = (*(np.asarray(color) / 255.0), alpha)
        handles.append(Patch(color=np.asarray(color) / 255.0, label=f"{value} {name}"))
    if (label_slice == IGNORE_LABEL).any():
        handles.append(Patch(facecolor="none", edgecolor="grey", label="255 ignore"))
    ax.imshow(overlay, interpolation="nearest")
    fig.legend(handles=handles, loc="upper center", ncol=len(handles), fontsize=8,
               frameon=False, bbox_to_anchor=(0.5, 1.0 - 34 / height))
