"""The labelling loop: export slices to paint, import the masks of just those slices.

* ``export_slices`` writes chosen slices of a volume as 8-bit pictures named by axis and
  index (``z00042.png``) with one intensity window for all of them, plus ``manifest.json``
  (volume, shape, axis, indices, window and the colour table to paint with).
* ``import_sparse_masks`` reads colour masks of any subset of slices, matched by the index in
  the file name, into a label store shaped like the volume; slices without a mask are 255.
* ``import_label_volume`` reads a label array as labelling tools save it (zarr, TIFF, NPY,
  HDF5), mapping its "unlabelled" value to 255.
* Slice lists (``suggest-slices`` writes them, ``export-slices --suggestions`` reads them):
  one index a line, optionally followed by a score; ``# axis: z`` names the axis.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import numpy as np

from magseg_hpc.axes import AXES
from magseg_hpc.classes import IGNORE_LABEL, ClassTable
from magseg_hpc.data.masks import (
    MaskImport,
    MaskTally,
    mask_files,
    read_mask,
    refuse_no_labels,
)
from magseg_hpc.errors import MagsegError
from magseg_hpc.paths import atomic_write, volume_file
from magseg_hpc.staging import staged_output
from magseg_hpc.volume.io import open_volume, soft_var
from magseg_hpc.volume.store import (
    create_label_store,
    default_chunks,
    refuse_existing,
    set_complete,
    write_label_region,
)
from magseg_hpc.volume.support import (
    describe,
    display_window,
    is_masked,
    open_input,
    plane_support,
    resolve_support,
)

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
MANIFEST_FORMAT = "magseg-hpc/slices/1"
FORMATS = {"png": ".png", "tiff": ".tif"}
PERCENTILES = (1.0, 99.5)
WINDOW_SAMPLES = 2**21


def slice_name(axis: str, index: int) -> str:
    return f"{axis}{index:05d}"


def _region(axis: str, index: int) -> tuple:
    region = [slice(None)] * 3
    region[AXES.index(axis)] = slice(index, index + 1)
    return tuple(region)


def _check_axis(axis: str) -> str:
    if axis not in AXES:
        raise MagsegError(f"axis {axis!r}: choose one of z, y, x")
    return axis


# --- slice lists -----------------------------------------------------------------------------


def write_slice_list(path: str | Path, indices, *, axis: str, scores=None,
                     header: str = "") -> None:
    """One index a line (and its score), after ``#`` lines; written atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [f"# {line}" for line in header.splitlines() if line] + [f"# axis: {axis}"]
    for k, i in enumerate(indices):
        lines.append(f"{int(i)}" if scores is None else f"{int(i)}\t{float(scores[k]):.6f}")
    atomic_write(path, "\n".join(lines) + "\n")


def read_slice_list(path: str | Path) -> tuple[list[int], str | None]:
    """(indices, axis or None) of a slice list."""
    path = Path(path)
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise MagsegError(f"{path}: cannot read the slice list ({type(e).__name__})") from None
    indices, axis = [], None
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if line.startswith("#"):
            # `# axis: X` (any case) names x; an axis line naming no axis is refused, not
            # read as the default z
            m = re.match(r"#\s*axis\s*[:=]\s*(\S+)\s*$", line, re.IGNORECASE)
            if m:
                axis = m.group(1).lower()
                if axis not in AXES:
                    raise MagsegError(f"{path}:{n}: {line!r} names no axis; write "
                                      "`# axis: z`, y or x")
            continue
        if not line:
            continue
        try:
            indices.append(int(line.split()[0].rstrip(",")))
        except ValueError:
            raise MagsegError(
                f"{path}:{n}: {line!r} is not a slice index; give one integer a line"
            ) from None
    if not indices:
        raise MagsegError(f"{path}: lists no slices")
    return indices, axis


def choose_indices(size: int, *, n: int | None = None, slices: list[int] | None = None,
                   axis: str = "z") -> list[int]:
    """``n`` evenly spread indices of ``0..size-1`` (ends excluded), or ``slices`` checked."""
    if n is not None:
        if not 1 <= n <= size:
            raise MagsegError(f"--n {n}: choose 1 to {size} slices (the volume has {size} "
                              f"along {axis})")
        # the centres of n equal parts: spread out, away from the faces
        return sorted({int((k + 0.5) * size / n) for k in range(n)})
    bad = [i for i in slices or [] if not 0 <= i < size]
    if bad:
        raise MagsegError(f"slice {bad[0]} along {axis} is out of range 0..{size - 1}")
    if not slices:
        raise MagsegError("no slices chosen; give --n, --slices or --suggestions")
    return sorted(set(slices))


# --- export ----------------------------------------------------------------------------------


def intensity_window(samples: np.ndarray, support: dict, percentiles=PERCENTILES) -> dict:
    """The grey window of an export: percentiles of the finite samples inside the sample
    (the masked outside left out); signed data (values on both sides of 0) get a window
    symmetric about 0, so 0 is mid grey and the two orientations are as dark as bright."""
    lo, hi, signed = display_window(samples, support, percentiles)
    return {"low": lo, "high": hi, "percentiles": list(percentiles), "signed": signed,
            "outside": describe(support), "masked": is_masked(support)}


def to_uint8(image: np.ndarray, window: dict) -> np.ndarray:
    scaled = (np.asarray(image, np.float64) - window["low"]) / (window["high"] - window["low"])
    return np.rint(np.clip(np.nan_to_num(scaled), 0, 1) * 255).astype(np.uint8)


# On a masked reconstruction the sample is drawn in SAMPLE_FLOOR..255 and only the outside is
# black: a dark domain clipped to the masked zero is dark grey, not the outside's black.
SAMPLE_FLOOR = 64


def picture(plane: np.ndarray, window: dict, support: dict) -> np.ndarray:
    """A slice as the 8-bit picture to paint on (see SAMPLE_FLOOR for masked volumes)."""
    pixels = to_uint8(plane, window)
    if not is_masked(support):
        return pixels
    support = plane_support(np.asarray(plane), support)
    inside = SAMPLE_FLOOR + np.rint(pixels * ((255 - SAMPLE_FLOOR) / 255)).astype(np.uint8)
    return np.where(support, inside, 0).astype(np.uint8)


def grey_levels(window: dict, table: ClassTable) -> dict:
    """What the pictures' grey levels mean, for the manifest."""
    window_text = f"intensity window {window['low']:.4g}..{window['high']:.4g}" + (
        " (signed: 0 is mid grey)" if window["signed"] else "")
    if not window["masked"]:
        return {"0-255": window_text}
    inside = f"the sample, {window_text}"
    if table.names[:3] == ClassTable.default().names:
        inside += (f": dark is {table.names[1]}, bright {table.names[2]} (a dark domain at the "
                   "masked value is drawn at the floor, dark grey)")
    return {"0": f"outside the sample support ({window['outside']}): paint {table.names[0]}",
            f"{SAMPLE_FLOOR}-255": inside}


def export_slices(volume_path: str, out_dir: str | Path, indices: list[int], *, axis: str = "z",
                  var: str | None = None, fmt: str = "png", overwrite: bool = False,
                  class_table: ClassTable | None = None, outside: str | None = None,
                  mask: str | None = None) -> dict:
    """Write the slices ``indices`` along ``axis`` as 8-bit pictures and a manifest; returns
    the manifest. Slices are read twice (window, then pictures), one at a time."""
    from PIL import Image

    refuse_existing(out_dir, overwrite, MANIFEST_FORMAT)
    _check_axis(axis)
    if fmt not in FORMATS:
        raise MagsegError(f"--format {fmt}: choose one of {', '.join(FORMATS)}")
    volume = open_input(volume_path, var, mask)
    support = resolve_support(volume, outside, mask=mask)
    size = int(volume.sizes[axis])
    indices = choose_indices(size, slices=indices, axis=axis)
    per_slice = max(1, WINDOW_SAMPLES // len(indices))
    samples = []
    for i in indices:
        flat = np.asarray(volume.isel({axis: i}).values).ravel()
        samples.append(flat[:: max(1, flat.size // per_slice)])
    window = intensity_window(np.concatenate(samples), support)
    table = class_table or ClassTable.default()
    names = [slice_name(axis, i) + FORMATS[fmt] for i in indices]
    manifest = {
        "format": MANIFEST_FORMAT,
        "volume": str(volume_file(volume_path).resolve()),
        "var": var,
        "shape": [int(n) for n in volume.shape],
        "axis": axis,
        "indices": indices,
        "files": names,
        "window": window,
        "encoding": {"support": support, "signed": window["signed"]},
        "grey_levels": grey_levels(window, table),
        "colors": {n: list(c) for n, c in zip(table.names, table.colors, strict=True)},
        "class_table": table.to_dict(),
        "ignore_label": IGNORE_LABEL,
        "paint": "paint every pixel of a slice in one of `colors` and save the mask as PNG "
                 "named like the slice (e.g. " + names[0].rsplit(".", 1)[0] + ".png); then "
                 "magseg-hpc import-masks MASKS_DIR LABELS.zarr --colors manifest.json "
                 "--like VOLUME",
    }
    with staged_output(out_dir, overwrite, MANIFEST_FORMAT) as tmp:
        tmp.mkdir(parents=True)
        for i, name in zip(indices, names, strict=True):
            pixels = picture(volume.isel({axis: i}).values, window, support)
            if fmt == "png":
                Image.fromarray(pixels).save(tmp / name)
            else:
                import tifffile

                tifffile.imwrite(tmp / name, pixels)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


# --- sparse import ---------------------------------------------------------------------------


def index_from_name(path: Path) -> tuple[str | None, int]:
    """(axis letter or None, index) from a file name like ``z00042.png`` or ``slice_42.png``."""
    stem = path.stem
    m = re.search(r"(?<![a-zA-Z])([zyxZYX])_?(\d+)", stem)
    if m:
        return m.group(1).lower(), int(m.group(2))
    digits = re.findall(r"\d+", stem)
    if not digits:
        raise MagsegError(
            f"{path}: no slice index in the file name; name masks like the exported slices "
            "(e.g. z00042.png)"
        )
    return None, int(digits[-1])


def _report(result: MaskImport) -> MaskImport:
    if result.unknown:
        shown = ", ".join(f"{list(c)} x{k}" for c, k in result.unknown_colors)
        log.warning(
            "%d pixels of the labelled slices have colours (or values) not in the class table "
            "and were set to %d (ignore)%s", result.unknown, IGNORE_LABEL,
            f"; most common: {shown}" if shown else "",
        )
    return result


def import_sparse_masks(masks_dir: str | Path, out: str | Path, class_table: ClassTable,
                        like: str, *, axis: str | None = None, var: str | None = None,
                        overwrite: bool = False,
                        chunks: tuple[int, int, int] | None = None) -> MaskImport:
    """Colour masks of some slices of the volume ``like`` -> a label store shaped like it.

    Each mask's slice is the index in its file name (``z00042.png``: z slice 42); slices
    without a mask are 255 (unlabelled). Everything is checked before anything is written.
    """
    refuse_existing(out, overwrite)
    files = mask_files(masks_dir)
    named = [(f, *index_from_name(f)) for f in files]
    letters = {a for _, a, _ in named if a}
    if axis is None:
        if len(letters) > 1:
            raise MagsegError(f"{masks_dir}: masks name several axes "
                              f"({', '.join(sorted(letters))}); import one axis at a time")
        axis = letters.pop() if letters else "z"
    _check_axis(axis)
    other = [f for f, a, _ in named if a and a != axis]
    if other:
        raise MagsegError(f"{other[0]}: names another axis than --axis {axis}")
    volume = open_volume(like, var=var)
    size = int(volume.sizes[axis])
    slice_shape = tuple(n for d, n in zip(AXES, volume.shape, strict=True) if d != axis)
    seen: dict[int, Path] = {}
    for f, _, i in named:
        if not 0 <= i < size:
            raise MagsegError(f"{f}: slice {i} is out of range 0..{size - 1} along {axis} of "
                              f"{like}")
        if i in seen:
            raise MagsegError(f"{seen[i].name} and {f.name} are both masks of {axis} slice {i}; "
                              "keep one")
        seen[i] = f
    from PIL import Image

    with Image.open(files[0]) as im:
        size_hw = (im.height, im.width)
    if size_hw != slice_shape:
        raise MagsegError(
            f"{files[0]}: mask is {size_hw[0]}x{size_hw[1]} but {axis} slices of {like} are "
            f"{slice_shape[0]}x{slice_shape[1]}; export and paint slices of this volume"
        )
    tally = MaskTally(class_table)
    indices = sorted(seen)
    provenance = {
        "source": str(Path(masks_dir).resolve()), "kind": "imported colour masks (sparse)",
        "like": str(like), "axis": axis,
        "files": {str(i): seen[i].name for i in indices}, "colors": class_table.to_dict(),
    }
    with staged_output(out, overwrite) as tmp:
        create_label_store(tmp, like=volume, class_table=class_table, provenance=provenance,
                           chunks=chunks, fill_value=IGNORE_LABEL)
        for i in indices:
            labels = tally.labels(read_mask(seen[i]))
            write_label_region(tmp, _region(axis, i), np.expand_dims(labels, AXES.index(axis)))
        tally.complete(tmp, masks_dir, labelled={"axis": axis, "indices": indices})
    return _report(tally.result(volume.shape, axis=axis, labelled=indices))


def import_label_volume(src: str, out: str | Path, class_table: ClassTable, *,
                        like: str | None = None, var: str | None = None, axis: str = "z",
                        unlabelled_value: int | None = None,
                        class_values: list[int] | None = None, overwrite: bool = False,
                        chunks: tuple[int, int, int] | None = None) -> MaskImport:
    """A label array (zarr, TIFF, NPY, HDF5) -> a label store. ``class_values[k]`` is the
    value that means class ``k`` (default ``k``); ``unlabelled_value`` and any other value
    become 255 (others are counted in a warning). Streams z slabs."""
    refuse_existing(out, overwrite)
    _check_axis(axis)
    labels = open_volume(src, **soft_var(var, "labels"))
    if labels.dtype.kind not in "iu":
        raise MagsegError(f"{src}: holds {labels.dtype} values, not integer labels")
    values = list(range(class_table.num_classes)) if class_values is None else list(class_values)
    if len(values) != class_table.num_classes or len(set(values)) != len(values):
        raise MagsegError(f"--class-values {','.join(map(str, values))}: give one distinct value "
                          f"per class ({', '.join(class_table.names)})")
    if unlabelled_value is not None and unlabelled_value in values:
        k = values.index(unlabelled_value)
        raise MagsegError(
            f"--unlabelled-value {unlabelled_value} is also the value of class "
            f"{class_table.names[k]}; give the class values with --class-values (e.g. "
            f"{','.join(str(v + 1) for v in range(len(values)))})"
        )
    shape = tuple(int(n) for n in labels.shape)
    target = labels
    if like is not None:
        target = open_volume(like)
        if tuple(target.shape) != shape:
            raise MagsegError(f"{src}: labels have shape {'x'.join(map(str, shape))} but {like} "
                              f"has {'x'.join(map(str, target.shape))}")
    chunks = default_chunks(shape, chunks)
    counts = np.zeros(IGNORE_LABEL + 1, dtype=np.int64)
    unknown = 0
    carries = np.zeros(shape[AXES.index(axis)], bool)
    others = tuple(k for k in range(3) if k != AXES.index(axis))
    provenance = {"source": str(src), "kind": "imported label volume",
                  "unlabelled_value": unlabelled_value, "class_values": values}
    with staged_output(out, overwrite) as tmp:
        create_label_store(tmp, like=target, class_table=class_table, provenance=provenance,
                           chunks=chunks, fill_value=IGNORE_LABEL)
        for z0 in range(0, shape[0], chunks[0]):
            z1 = min(z0 + chunks[0], shape[0])
            block = np.asarray(labels.data[z0:z1].compute(scheduler="synchronous"))
            mapped = np.full(block.shape, IGNORE_LABEL, np.uint8)
            for k, v in enumerate(values):
                mapped[block == v] = k
            stray = (mapped == IGNORE_LABEL) & (block != IGNORE_LABEL)
            if unlabelled_value is not None:
                stray &= block != unlabelled_value
            unknown += int(stray.sum())
            counts += np.bincount(mapped.ravel(), minlength=IGNORE_LABEL + 1)
            some = (mapped != IGNORE_LABEL).any(axis=others)
            if axis == "z":
                carries[z0:z1] |= some
            else:
                carries |= some
            write_label_region(tmp, (slice(z0, z1), slice(None), slice(None)), mapped)
        per_class = {n: int(counts[k]) for k, n in enumerate(class_table.names)}
        refuse_no_labels(per_class, src, class_table, values=values)
        indices = np.flatnonzero(carries).tolist()
        set_complete(tmp, unknown=unknown, counts=per_class,
                     labelled={"axis": axis, "indices": indices})
    return _report(MaskImport(shape=shape, class_table=class_table, counts=per_class,
                              unknown=unknown, axis=axis, labelled=indices))
