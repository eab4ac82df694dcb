"""Import hand-drawn colour masks (as labelling tools export them) into a label store.

A mask folder holds one colour PNG per z slice, sorted by file name (the same order in which
``open_volume`` stacks a folder of PNG images, so masks and images line up). A colour file
maps each class, in class order, to the RGB colour the labelling tool painted it with::

    # YAML or JSON; a mapping in class order
    {"background": [149, 0, 255], "domain_minus": [30, 0, 255], "domain_plus": [255, 0, 0]}

    # or a list: of [r, g, b] (default class names), of {"name": ..., "color": ...},
    # or the class-table form {"names": [...], "colors": [...]}; colours may be "#rrggbb".

Pixels of any other colour (anti-aliased edges, stray strokes) become 255, the ignore label,
and are counted in a warning rather than silently turned into a class. Transparent pixels
(alpha 0 in an RGBA or palette PNG) were not painted: they are 255 too, whatever RGB colour
the file keeps under them, and are not counted as unknown colours.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from magseg_hpc.axes import AXES
from magseg_hpc.classes import IGNORE_LABEL, ClassTable
from magseg_hpc.errors import MagsegError
from magseg_hpc.staging import staged_output
from magseg_hpc.volume.io import slice_files
from magseg_hpc.volume.store import (
    LABEL_FORMAT,
    create_label_store,
    default_chunks,
    refuse_existing,
    set_complete,
    write_label_region,
)
from magseg_hpc.yamlfile import load_yaml

log = logging.getLogger(__name__)

COLORS_EXAMPLE = '{"background": [149, 0, 255], "domain_minus": [30, 0, 255], ...}'


@dataclass
class MaskImport:
    """What an import found: the volume shape, voxels per class and the unknown colours."""

    shape: tuple[int, int, int]
    class_table: ClassTable
    counts: dict[str, int]
    unknown: int
    unknown_colors: list[tuple[tuple[int, int, int], int]] = field(default_factory=list)
    axis: str = "z"
    labelled: list[int] | None = None  # slices that carry labels (None: every slice)

    @property
    def total(self) -> int:
        return int(np.prod(self.shape))


# --- colour file ----------------------------------------------------------------------------


def load_colors(path: str | Path) -> ClassTable:
    """Read a colour file (YAML or JSON) into a ClassTable; a bad file is one clear error."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise MagsegError(
            f"{path}: colour file not found; give a YAML/JSON file like {COLORS_EXAMPLE}"
        )
    try:
        data = load_yaml(path.read_text())  # YAML is a superset of JSON
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise MagsegError(f"{path}: not valid YAML or JSON ({first})") from e
    return colors_to_class_table(data, source=str(path))


def colors_to_class_table(data, source: str = "colour table") -> ClassTable:
    """Turn the accepted colour-table forms (see module docstring) into a ClassTable."""
    names: list[str]
    colors: list
    if isinstance(data, dict) and isinstance(data.get("class_table"), dict):
        data = data["class_table"]  # an export-slices manifest.json
    if isinstance(data, dict) and set(data) == {"names", "colors"}:
        names, colors = list(data["names"]), list(data["colors"])
    elif isinstance(data, dict) and data:
        names, colors = [str(k) for k in data], list(data.values())
    elif isinstance(data, list) and data and all(isinstance(e, dict) for e in data):
        try:
            names = [str(e["name"]) for e in data]
            colors = [e.get("color", e.get("colour")) for e in data]
        except KeyError:
            raise MagsegError(
                f"{source}: list entries need 'name' and 'color', e.g. "
                '[{"name": "background", "color": [149, 0, 255]}, ...]'
            ) from None
    elif isinstance(data, list) and data:
        colors = list(data)
        default = ClassTable.default().names
        if len(colors) == len(default):
            names = list(default)
        else:
            names = [f"class_{i}" for i in range(len(colors))]
    else:
        raise MagsegError(
            f"{source}: expected a mapping of class name to [r, g, b] in class order, "
            f"like {COLORS_EXAMPLE}; got {type(data).__name__}"
        )
    if len(names) != len(colors):
        raise MagsegError(
            f"{source}: {len(names)} names but {len(colors)} colours; give one colour per class"
        )
    rgb = [_parse_color(c, name, source) for name, c in zip(names, colors, strict=True)]
    if len(set(rgb)) != len(rgb):
        raise MagsegError(f"{source}: two classes share a colour ({rgb}); give each its own")
    return ClassTable(names=tuple(names), colors=tuple(rgb))


def _parse_color(value, name: str, source: str) -> tuple[int, int, int]:
    if isinstance(value, str) and value.startswith("#") and len(value) == 7:
        try:
            return tuple(int(value[i : i + 2], 16) for i in (1, 3, 5))  # type: ignore[return-value]
        except ValueError:
            pass
    elif isinstance(value, list | tuple) and len(value) == 3:
        if all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 255 for v in value):
            return tuple(value)  # type: ignore[return-value]
    raise MagsegError(
        f"{source}: colour of class {name!r} is {value!r}; give [r, g, b] integers in 0..255 "
        "or '#rrggbb'"
    )


# --- masks ----------------------------------------------------------------------------------


def mask_files(folder: str | Path) -> list[Path]:
    """The folder's ``*.png`` files sorted by name, after checking they are PNGs of one size."""
    from PIL import Image, UnidentifiedImageError

    folder = Path(folder)
    if not folder.exists():
        raise MagsegError(f"{folder}: no such folder; give the folder of exported PNG masks")
    if not folder.is_dir():
        raise MagsegError(f"{folder}: not a folder; give the folder of exported PNG masks")
    files = sorted(slice_files(folder, (".png",)))  # the slice-folder rule of open_volume
    if not files:
        raise MagsegError(f"{folder}: no .png masks in this folder; export one PNG per slice")
    first_size = None
    for f in files:
        try:
            with Image.open(f) as im:
                fmt, size = im.format, im.size
        except (UnidentifiedImageError, OSError) as e:
            raise MagsegError(f"{f}: not a readable PNG image ({type(e).__name__})") from e
        if fmt != "PNG":
            raise MagsegError(f"{f}: is a {fmt} image with a .png name; export masks as PNG")
        if first_size is None:
            first_size = size
        elif size != first_size:
            raise MagsegError(
                f"{f}: mask is {size[0]}x{size[1]} (WxH) but {files[0].name} is "
                f"{first_size[0]}x{first_size[1]}; all masks of a volume must have one size"
            )
    return files


def read_mask(path: str | Path) -> np.ndarray:
    """A mask as an (H, W, 4) uint8 RGBA array (palette, grey and RGB exports converted; a
    file without alpha is opaque). The alpha is kept: a transparent pixel is unpainted."""
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGBA"))


def colors_to_labels(rgb: np.ndarray, class_table: ClassTable) -> np.ndarray:
    """Map an (..., 3) RGB or (..., 4) RGBA array to uint8 labels; colours not in the table
    become 255, and so do transparent pixels (alpha 0), not the class of their hidden RGB."""
    packed = _pack(rgb)
    labels = np.full(packed.shape, IGNORE_LABEL, dtype=np.uint8)
    for value, color in enumerate(class_table.colors):
        labels[packed == _pack(np.asarray(color, dtype=np.uint8))] = value
    labels[~_painted(rgb)] = IGNORE_LABEL
    return labels


def _painted(rgb: np.ndarray) -> np.ndarray:
    """Pixels that carry a colour: all of RGB, those with alpha > 0 of RGBA."""
    rgb = np.asarray(rgb)
    return rgb[..., 3] != 0 if rgb.shape[-1] == 4 else np.ones(rgb.shape[:-1], bool)


def count_unknown(rgb: np.ndarray, labels: np.ndarray, into: dict[int, int]) -> int:
    """Painted pixels (transparent ones are unlabelled on purpose) whose colour is not in the
    table: added to ``into`` (packed colour -> pixels); returns how many."""
    bad = (labels == IGNORE_LABEL) & _painted(rgb)
    if not bad.any():
        return 0
    colors, n = np.unique(_pack(rgb[bad]), return_counts=True)
    for c, k in zip(colors.tolist(), n.tolist(), strict=True):
        into[c] = into.get(c, 0) + k
    return int(bad.sum())


def refuse_no_labels(counts: dict[str, int], source, class_table: ClassTable, *,
                     colors: dict[int, int] | None = None, values: list | None = None) -> None:
    """Refuse an import that labels nothing (``counts``: pixels per class): the masks were
    painted with other colours than the table's (``colors``: the packed colours seen) or a
    label array uses other values (``values``: the class values asked for). An all-255
    store would train on nothing; the import is staged, so nothing is written."""
    if sum(counts.values()):
        return
    if values is not None:
        wanted = ", ".join(f"{n} {v}" for n, v in zip(class_table.names, values, strict=True))
        raise MagsegError(
            f"{source}: no voxel holds a class value ({wanted}); give the values the labels "
            "use with --class-values (and --unlabelled-value); nothing was written")
    table = ", ".join(f"{n} {list(c)}" for n, c in zip(class_table.names, class_table.colors,
                                                       strict=True))
    top = sorted((colors or {}).items(), key=lambda kv: -kv[1])[:3]
    seen = ", ".join(f"[{c >> 16 & 255}, {c >> 8 & 255}, {c & 255}] x{k}" for c, k in top)
    raise MagsegError(
        f"{source}: no pixel of the masks has a colour of the class table ({table}); "
        + (f"they hold {seen}" if seen else "every pixel is transparent")
        + "; paint with the table's colours, or give the table the masks were painted with "
        "(--colors); nothing was written")


def _pack(rgb: np.ndarray) -> np.ndarray:
    rgb = np.asarray(rgb, dtype=np.uint32)
    return (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]


class MaskTally:
    """What a colour-mask import counts while it writes: pixels per class, and the painted
    pixels whose colour is not in the table (by packed colour), one place for every import."""

    def __init__(self, class_table: ClassTable) -> None:
        self.class_table = class_table
        self.counts = np.zeros(IGNORE_LABEL + 1, dtype=np.int64)
        self.colors: dict[int, int] = {}
        self.unknown = 0

    def labels(self, rgb: np.ndarray) -> np.ndarray:
        """``rgb``'s labels (colors_to_labels), counted."""
        labels = colors_to_labels(rgb, self.class_table)
        self.counts += np.bincount(labels.ravel(), minlength=IGNORE_LABEL + 1)
        self.unknown += count_unknown(rgb, labels, self.colors)
        return labels

    def per_class(self) -> dict[str, int]:
        return {n: int(self.counts[k]) for k, n in enumerate(self.class_table.names)}

    def complete(self, store: Path, source, **fields) -> None:
        """Refuse an import that labels nothing, else mark the staged ``store`` complete with
        the counts (and ``fields``)."""
        per_class = self.per_class()
        refuse_no_labels(per_class, source, self.class_table, colors=self.colors)
        set_complete(store, unknown=self.unknown, counts=per_class, **fields)

    def result(self, shape: tuple[int, ...], **fields) -> MaskImport:
        """The import's MaskImport: the five most common unknown colours as RGB."""
        top = sorted(self.colors.items(), key=lambda kv: -kv[1])[:5]
        return MaskImport(
            shape=tuple(int(n) for n in shape), class_table=self.class_table,
            counts=self.per_class(), unknown=self.unknown,
            unknown_colors=[(((c >> 16) & 255, (c >> 8) & 255, c & 255), k) for c, k in top],
            **fields)


def import_masks(
    masks_dir: str | Path,
    out: str | Path,
    class_table: ClassTable,
    *,
    overwrite: bool = False,
    chunks: tuple[int, int, int] | None = None,
) -> MaskImport:
    """Convert a folder of colour masks into a label store at ``out``.

    All files are checked (PNG, one size) before anything is written; the store is written
    slab by slab into a staged folder that replaces ``out`` only when complete.
    """
    import dask.array as da
    import xarray as xr

    refuse_existing(out, overwrite, LABEL_FORMAT)
    files = mask_files(masks_dir)
    first = read_mask(files[0])
    shape = (len(files), first.shape[0], first.shape[1])
    chunks = default_chunks(shape, chunks)
    # Only the shape and coordinates of `like` are used; nothing is computed from it.
    like = xr.DataArray(da.zeros(shape, dtype=np.uint8, chunks=chunks), dims=AXES)
    tally = MaskTally(class_table)
    provenance = {
        "source": str(Path(masks_dir).resolve()),
        "kind": "imported colour masks",
        "files": [f.name for f in files],
        "colors": class_table.to_dict(),
    }
    with staged_output(out, overwrite, LABEL_FORMAT) as tmp:
        create_label_store(
            tmp, like=like, class_table=class_table, provenance=provenance, chunks=chunks
        )
        for z0 in range(0, shape[0], chunks[0]):
            z1 = min(z0 + chunks[0], shape[0])
            rgb = np.stack([first if z == 0 else read_mask(files[z]) for z in range(z0, z1)])
            write_label_region(tmp, (slice(z0, z1), slice(None), slice(None)),
                               tally.labels(rgb))
        tally.complete(tmp, masks_dir)
    result = tally.result(shape)
    if result.unknown:
        shown = ", ".join(f"{list(c)} x{k}" for c, k in result.unknown_colors)
        log.warning(
            "%d of %d pixels (%.2f%%) have colours not in the colour table and were set to %d "
            "(ignore); most common: %s",
            result.unknown, result.total, 100.0 * result.unknown / result.total, IGNORE_LABEL,
            shown,
        )
    return result
