"""The zarr stores magseg-hpc writes: image stores and the labelled output format.

Both are zarr format 3 groups that ``xarray.open_zarr`` opens as a Dataset:

- image store (``ingest``, ``make-phantom``): ``image`` (dims z, y, x), optionally ``labels``,
  coordinate arrays, and OME-Zarr (NGFF 0.5) ``multiscales`` metadata pointing at ``image``.
- label store (``segment-volume``, ``import-masks``): ``labels`` (uint8, dims z, y, x, the
  source's coordinates), optional ``probabilities`` (uint8, probability x 255, dims
  class, z, y, x), the class table and provenance in attrs, and NGFF 0.5 label metadata
  (``multiscales`` + ``image-label`` with the class colours and names) on the group, so the
  store itself is an OME-Zarr label image.

Stores are written region by region (a slab at a time), never holding the whole volume.
Region writes aligned with chunk boundaries touch disjoint chunk files, so workers in
different processes write without locks.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np
import xarray as xr
import zarr
from zarr.codecs import BloscCodec, GzipCodec, ZstdCodec

from magseg_hpc import __version__
from magseg_hpc.axes import AXES as DIMS
from magseg_hpc.classes import ClassTable
from magseg_hpc.errors import MagsegError
from magseg_hpc.outputs import check_output, record_owner, remove_tool_store
from magseg_hpc.staging import staged_output
from magseg_hpc.volume.io import open_volume, reading, soft_var

log = logging.getLogger(__name__)

LABEL_FORMAT = "magseg-hpc/labels/1"
DEFAULT_CHUNKS = (32, 256, 256)
CODECS = {
    "zstd": lambda: ZstdCodec(level=3),
    "blosc-zstd": lambda: BloscCodec(cname="zstd", clevel=3, shuffle="shuffle"),
    "blosc-lz4": lambda: BloscCodec(cname="lz4", clevel=5, shuffle="shuffle"),
    "gzip": lambda: GzipCodec(level=5),
    "none": None,
}


def codec(name: str):
    if name not in CODECS:
        raise MagsegError(f"unknown codec {name!r}; choose one of {', '.join(CODECS)}")
    make = CODECS[name]
    return [make()] if make else None


def default_chunks(shape: tuple[int, ...], chunks: tuple[int, ...] | None = None) -> tuple:
    """Chunks clipped to the shape; refuses chunks that are not positive integers."""
    chunks = tuple(chunks or DEFAULT_CHUNKS[-len(shape):])
    if len(chunks) != len(shape) or any(int(c) < 1 for c in chunks):
        raise MagsegError(
            f"chunks {','.join(map(str, chunks))} do not fit a volume of shape "
            f"{'x'.join(map(str, shape))}; give {len(shape)} positive sizes like 32,256,256"
        )
    return tuple(min(int(c), int(n)) for c, n in zip(chunks, shape))


IMAGE_FORMAT = "magseg-hpc/image/1"


def refuse_existing(path: str | Path, overwrite: bool, expect: str | None = None) -> None:
    """Refuse an existing output unless it is a store this tool wrote (of the ``expect``
    format, when given) and ``overwrite``."""
    check_output(path, overwrite, expect=expect)


def _coord_values(like: xr.DataArray | None, shape: tuple[int, ...]) -> dict[str, np.ndarray]:
    coords = {}
    for dim, n in zip(DIMS, shape):
        if like is not None and dim in like.coords and like.coords[dim].ndim == 1:
            values = np.asarray(like.coords[dim].values)
            if values.dtype.kind in "iuf":
                coords[dim] = values
                continue
        coords[dim] = np.arange(n, dtype=np.int64)
    return coords


def _create_coords(group: zarr.Group, coords: dict[str, np.ndarray]) -> None:
    for dim, values in coords.items():
        arr = group.create_array(
            dim, shape=values.shape, dtype=values.dtype, dimension_names=[dim], chunks=values.shape
        )
        arr[:] = values


def _ngff_axes() -> list[dict]:
    return [{"name": d, "type": "space"} for d in DIMS]


def _ngff_multiscales(path: str, name: str, like: xr.DataArray | None) -> list[dict]:
    scale = []
    for dim in DIMS:
        step = 1.0
        if like is not None and dim in like.coords and like.sizes[dim] > 1:
            values = np.asarray(like.coords[dim].values)
            if values.dtype.kind in "iuf":
                step = float(abs(values[1] - values[0])) or 1.0
        scale.append(step)
    return [
        {
            "name": name,
            "axes": _ngff_axes(),
            "datasets": [
                {"path": path, "coordinateTransformations": [{"type": "scale", "scale": scale}]}
            ],
        }
    ]


def image_label_metadata(class_table: ClassTable) -> dict:
    """NGFF ``image-label``: a colour and a class name for each label value."""
    return {
        "version": "0.5",
        "colors": [
            {"label-value": i, "rgba": [*c, 255]} for i, c in enumerate(class_table.colors)
        ],
        "properties": [
            {"label-value": i, "class": n} for i, n in enumerate(class_table.names)
        ],
    }


def consolidate(path: str | Path) -> None:
    """Consolidate metadata so ``xarray.open_zarr`` opens the store with one read, silently."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zarr notes consolidation is not yet in the v3 spec
        zarr.consolidate_metadata(str(path))


def open_group(path: str | Path, mode: str = "r") -> zarr.Group:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return zarr.open_group(str(path), mode=mode)


def _members(group) -> list[str]:
    """The group's arrays. Listing them, zarr warns (ZarrUserWarning, on its own thread) that
    .magseg/ (the owner manifest, the run's state) is no zarr node: that note only is quiet."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=UserWarning,
                                message=r"Object at \.magseg is not recognized as a component")
        return list(group.keys())


def create_label_store(
    path: str | Path,
    *,
    like: xr.DataArray,
    class_table: ClassTable,
    provenance: dict,
    chunks: tuple[int, int, int] | None = None,
    with_probabilities: bool = False,
    overwrite: bool = False,
    fill_value: int = 0,
) -> None:
    """Create an empty label store shaped like ``like`` (a volume with dims z, y, x);
    unwritten voxels read as ``fill_value`` (255 for sparse hand labels)."""
    refuse_existing(path, overwrite, LABEL_FORMAT)
    shape = tuple(int(n) for n in like.shape)
    chunks = default_chunks(shape, chunks)
    if Path(path).exists():
        remove_tool_store(path)
    group = zarr.open_group(str(path), mode="w", zarr_format=3)
    # Marked as ours (and incomplete) before anything else, so a crash leaves a store that
    # --resume or --overwrite recognise.
    group.attrs["magseg_hpc"] = {"format": LABEL_FORMAT, "version": __version__,
                                 "complete": False}
    record_owner(path, LABEL_FORMAT, [])
    group.create_array(
        "labels", shape=shape, chunks=chunks, dtype="uint8", fill_value=fill_value,
        compressors=codec("zstd"), dimension_names=list(DIMS),
        attributes={"long_name": "class label", "flag_values": list(range(class_table.num_classes)),
                    "flag_meanings": " ".join(class_table.names)},
    )
    if with_probabilities:
        group.create_array(
            "probabilities", shape=(class_table.num_classes, *shape), chunks=(1, *chunks),
            dtype="uint8", fill_value=0, compressors=codec("zstd"),
            dimension_names=["class", *DIMS],
            attributes={"long_name": "class probability x 255", "scale_factor": 1 / 255},
        )
    _create_coords(group, _coord_values(like, shape))
    record_owner(path, LABEL_FORMAT, _members(group))  # the arrays created just now
    group.attrs.update(
        {
            "magseg_hpc": {"format": LABEL_FORMAT, "version": __version__, "complete": False},
            "class_table": class_table.to_dict(),
            "provenance": provenance,
            "ome": {
                "version": "0.5",
                "multiscales": _ngff_multiscales("labels", "labels", like),
                "image-label": image_label_metadata(class_table),
            },
        }
    )
    consolidate(path)


def write_label_region(
    path: str | Path,
    region: tuple[slice, slice, slice],
    labels: np.ndarray,
    probabilities: np.ndarray | None = None,
) -> None:
    """Write one region of labels (and class probabilities in [0, 1] or uint8) to a store."""
    group = open_group(path, mode="r+")
    group["labels"][region] = np.asarray(labels, dtype=np.uint8)
    if probabilities is not None:
        if "probabilities" not in group:
            raise MagsegError(f"{path}: store was created without probabilities")
        probs = np.asarray(probabilities)
        if probs.dtype != np.uint8:
            probs = np.clip(np.rint(probs * 255), 0, 255).astype(np.uint8)
        group["probabilities"][(slice(None), *region)] = probs


def set_complete(path: str | Path, complete: bool = True, **summary) -> None:
    """Mark a label store complete (every region written) and record a run summary."""
    group = open_group(path, mode="r+")
    meta = dict(group.attrs.get("magseg_hpc", {}))
    meta.update(complete=complete, **summary)
    group.attrs["magseg_hpc"] = meta
    consolidate(path)


def open_labels(path: str | Path, var: str | None = None) -> tuple[xr.DataArray, ClassTable]:
    """Open a label volume and its class table (the default table when the store has none).

    Without ``var``: a store's ``labels`` variable, else its only array (a plain zarr array,
    TIFF, NPY or HDF5 file as labelling tools save them).
    """
    labels = open_volume(path, **soft_var(var, "labels"))
    if labels.dtype.kind not in "iu":  # other integer types (e.g. TIFF masks) are fine
        name = repr(var) if var else "the label volume"
        raise MagsegError(f"{path}: {name} is {labels.dtype}, not an integer label volume")
    table = None
    if (Path(str(path)) / "zarr.json").is_file() or (Path(str(path)) / ".zattrs").is_file():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                node = zarr.open(store=str(path), mode="r")
        except (zarr.errors.BaseZarrError, OSError, ValueError, KeyError, TypeError) as e:
            log.warning("%s: cannot read its class table (%s); using the default", path, e)
        else:
            table = node.attrs.get("class_table") if isinstance(node, zarr.Group) else None
    return labels, ClassTable.from_dict(table) if table else ClassTable.default()


def write_image_store(
    path: str | Path,
    image,
    *,
    labels=None,
    class_table: ClassTable | None = None,
    chunks: tuple[int, int, int] | None = None,
    codec_name: str = "zstd",
    like: xr.DataArray | None = None,
    attrs: dict | None = None,
    image_attrs: dict | None = None,
    overwrite: bool = False,
    slab_callback=None,
) -> None:
    """Write ``image`` (numpy or dask, z, y, x) and optional ``labels`` to a new zarr store;
    ``attrs`` go to the group, ``image_attrs`` to the image (they travel with it when opened).

    Written slab by slab (one chunk row of z at a time) into a staged folder that replaces
    ``path`` only once complete. ``slab_callback(z0, z1, slab)`` sees every image slab
    before it is written (progress, checks); raising from it aborts without output.
    """
    shape = tuple(int(n) for n in image.shape)
    if len(shape) != 3:
        raise MagsegError(f"expected a 3D volume, got shape {shape}")
    chunks = default_chunks(shape, chunks)
    with staged_output(path, overwrite, IMAGE_FORMAT) as tmp:
        group = zarr.open_group(str(tmp), mode="w", zarr_format=3)
        # Every chunk gets a file, zeros too: a chunk without one is then a lost file, which
        # readers refuse (io.check_chunk_files) instead of reading the fill value.
        every_chunk = {"write_empty_chunks": True}
        img = group.create_array(
            "image", shape=shape, chunks=chunks, dtype=image.dtype, fill_value=0,
            compressors=codec(codec_name), dimension_names=list(DIMS), config=every_chunk,
        )
        lab = None
        if labels is not None:
            class_table = class_table or ClassTable.default()
            lab = group.create_array(
                "labels", shape=shape, chunks=chunks, dtype="uint8", fill_value=0,
                compressors=codec("zstd"), dimension_names=list(DIMS), config=every_chunk,
            )
        img.attrs.update(image_attrs or {})
        _create_coords(group, _coord_values(like, shape))
        record_owner(tmp, IMAGE_FORMAT, _members(group))
        for z0 in range(0, shape[0], chunks[0]):
            z1 = min(z0 + chunks[0], shape[0])
            with reading(like.attrs.get("source", "input") if like is not None else "input"):
                slab = np.asarray(image[z0:z1])
            if slab_callback is not None:
                slab_callback(z0, z1, slab)
            img[z0:z1] = slab
            if lab is not None:
                lab[z0:z1] = np.asarray(labels[z0:z1], dtype=np.uint8)
        meta = {
            "magseg_hpc": {"format": IMAGE_FORMAT, "version": __version__},
            "ome": {"version": "0.5", "multiscales": _ngff_multiscales("image", "image", like)},
            **(attrs or {}),
        }
        if class_table is not None:
            meta["class_table"] = class_table.to_dict()
        group.attrs.update(meta)
        consolidate(tmp)
