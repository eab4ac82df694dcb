"""What ``magseg-hpc info`` reports about a volume or a label store."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import dask.array as da
import numpy as np

from magseg_hpc.classes import ClassTable
from magseg_hpc.paths import volume_file
from magseg_hpc.volume.io import ZARR_MARKERS, open_volume, reading
from magseg_hpc.volume.store import open_group
from magseg_hpc.volume.support import describe as describe_support
from magseg_hpc.volume.support import open_input, resolve_support

log = logging.getLogger(__name__)


def disk_size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _zarr_details(path: Path, var: str) -> tuple[str | None, dict, ClassTable | None, list[str]]:
    """Codec, group attrs, class table and variable names of a zarr store (None if not zarr)."""
    import zarr

    if not (path.is_dir() and any((path / m).exists() for m in ZARR_MARKERS)):
        return None, {}, None, []  # not zarr: TIFF, HDF5, NPY, images
    try:
        group = open_group(path)
    except (zarr.errors.ContainsArrayError, zarr.errors.NodeTypeValidationError):
        return None, {}, None, []  # a single zarr array: no group attributes
    except (zarr.errors.BaseZarrError, OSError, ValueError, KeyError) as e:
        log.warning("%s: cannot read its zarr group metadata (%s)", path, e)
        return None, {}, None, []
    names = sorted(n for n, a in group.arrays() if a.ndim > 1)
    codec = None
    if var in names:
        codecs = getattr(group[var], "compressors", ()) or ()
        codec = ", ".join(type(c).__name__ for c in codecs) or "none"
    attrs = dict(group.attrs)
    table = attrs.get("class_table")
    return codec, attrs, ClassTable.from_dict(table) if table else None, names


def describe(path: str | os.PathLike, var: str | None = None, count_classes: bool = True,
             outside: str | None = None, mask: str | None = None) -> dict:
    volume = open_input(path, var, mask) if mask else open_volume(path, var=var)
    p = volume_file(path)
    var = var or ("labels" if volume.dtype == np.uint8 and volume.name == "labels" else volume.name)
    codec, attrs, table, names = _zarr_details(p, str(var))
    info = {
        "path": str(path),
        "variable": var,
        "variables": names,
        "shape": dict(zip(volume.dims, map(int, volume.shape))),
        "dtype": str(volume.dtype),
        "chunks": [int(c[0]) for c in volume.chunks] if volume.chunks else None,
        "codec": codec,
        "bytes_on_disk": disk_size(p) if p.exists() else None,
        "bytes_in_memory": int(volume.size * volume.dtype.itemsize),
        "coordinates": {
            d: [float(volume[d].values[0]), float(volume[d].values[-1])]
            for d in volume.dims if d in volume.coords and volume[d].dtype.kind in "iuf"
        },
        "attributes": {**attrs, **{k: v for k, v in volume.attrs.items() if k != "source"}},
    }
    is_labels = volume.dtype == np.uint8 and var != "image" and (table is not None
                                                                  or var == "labels")
    if not is_labels:  # where the sample's outside is: what every command will decide
        with reading(path):
            info["support"] = resolve_support(volume, outside, mask=mask)
    if is_labels and count_classes:
        table = table or ClassTable.default()
        with reading(path):
            counts = da.bincount(volume.data.ravel(), minlength=256).compute()
        info["class_counts"] = {
            **{name: int(counts[i]) for i, name in enumerate(table.names)},
            **({"ignore (255)": int(counts[255])} if counts[255] else {}),
        }
        other = int(counts.sum() - counts[: table.num_classes].sum() - counts[255])
        if other:
            info["class_counts"]["outside the class table"] = other
        info["class_table"] = table.to_dict()
    return info


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"


def format_info(info: dict) -> str:
    shape = " x ".join(f"{d}={n}" for d, n in info["shape"].items())
    lines = [
        f"{info['path']}  [{info['variable']}]",
        f"  shape        {shape}",
        f"  dtype        {info['dtype']}",
        f"  chunks       {info['chunks']}",
    ]
    if info["codec"]:
        lines.append(f"  codec        {info['codec']}")
    if info["bytes_on_disk"] is not None:
        ratio = info["bytes_in_memory"] / max(info["bytes_on_disk"], 1)
        lines.append(f"  store size   {human_bytes(info['bytes_on_disk'])} (ratio {ratio:.1f}x)")
    lines.append(f"  in memory    {human_bytes(info['bytes_in_memory'])}")
    if len(info["variables"]) > 1:
        lines.append(f"  variables    {', '.join(info['variables'])}")
    for d, (lo, hi) in info["coordinates"].items():
        lines.append(f"  coord {d:<6} {lo:g} .. {hi:g}")
    if "support" in info:
        lines.append(f"  outside      {describe_support(info['support'])}")
    if "class_counts" in info:
        total = sum(info["class_counts"].values()) or 1
        lines.append("  classes")
        colors = dict(zip(info["class_table"]["names"], info["class_table"]["colors"]))
        for name, n in info["class_counts"].items():
            rgb = f" rgb{tuple(colors[name])}" if name in colors else ""
            lines.append(f"    {name:<16} {n:>14,d} voxels {100 * n / total:6.2f}%{rgb}")
    for key, value in info["attributes"].items():
        if key in ("ome", "class_table"):
            continue
        text = repr(value)
        lines.append(f"  attr {key:<8} {text if len(text) < 110 else text[:107] + '...'}")
    return "\n".join(lines)
