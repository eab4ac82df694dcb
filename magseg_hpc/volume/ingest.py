"""Convert a volume in any readable format to a compressed zarr image store, streaming."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from magseg_hpc.errors import MagsegError
from magseg_hpc.outputs import check_no_overlap
from magseg_hpc.volume.io import check_chunk_files
from magseg_hpc.volume.store import (
    IMAGE_FORMAT,
    default_chunks,
    refuse_existing,
    write_image_store,
)
from magseg_hpc.volume.support import STORED_ATTR, describe, open_input, resolve_support

log = logging.getLogger(__name__)


class NonFiniteCounter:
    """Counts NaN/inf voxels slab by slab (inf only, when NaN is the outside); replaces them
    when a fill value was chosen."""

    def __init__(self, fill: float | None, nan_is_outside: bool = False):
        self.fill, self.count, self.first = fill, 0, None
        self.nan_is_outside = nan_is_outside

    def __call__(self, z0: int, z1: int, slab: np.ndarray) -> None:
        if slab.dtype.kind != "f":
            return
        bad = np.isinf(slab) if self.nan_is_outside else ~np.isfinite(slab)
        n = int(bad.sum())
        if not n:
            return
        if self.first is None:
            self.first = tuple(int(i) for i in np.argwhere(bad)[0] + (z0, 0, 0))
        self.count += n
        if self.fill is not None:
            slab[bad] = self.fill


def ingest(
    src: str | Path,
    out: str | Path,
    *,
    chunks: tuple[int, int, int] | None = None,
    var: str | None = None,
    codec_name: str = "zstd",
    fill_nonfinite: float | None = None,
    overwrite: bool = False,
    progress=None,
    outside: str | None = None,
    mask: str | Path | None = None,
    absent_chunks_are_fill: bool = False,
) -> dict:
    """Stream ``src`` into ``out`` (a zarr store with an ``image`` variable), with the
    volume's support decision (``outside``, ``mask``: magseg_hpc.volume.support) recorded in
    the image's attributes; a mask file is folded in as a NaN outside (float32).

    NaN voxels are the outside when the support says so (a NaN-masked reconstruction);
    otherwise, without ``fill_nonfinite``, NaN or inf voxels abort the conversion once all
    are counted, and nothing is written. A zarr input whose chunks lack files is refused
    unless ``absent_chunks_are_fill`` (its writer skipped chunks of only the fill value).
    """
    import math

    if fill_nonfinite is not None and not math.isfinite(fill_nonfinite):
        raise MagsegError(
            f"--fill-nonfinite {fill_nonfinite}: the fill value must be a finite number (e.g. 0)"
        )
    check_no_overlap(out, [src, mask])
    refuse_existing(out, overwrite, IMAGE_FORMAT)
    volume = open_input(src, var, mask)
    if min(volume.shape) < 1:
        raise MagsegError(f"{src}: volume is empty (shape {'x'.join(map(str, volume.shape))})")
    # before any voxel is read: a lost chunk file would read as the fill value
    check_chunk_files(src, var or volume.name, allow_absent=absent_chunks_are_fill)
    support = resolve_support(volume, outside, mask=mask)
    log.debug("%s: %s", src, describe(support))
    if fill_nonfinite is not None and volume.dtype.kind == "f":
        with np.errstate(over="ignore"):
            stored = np.asarray(fill_nonfinite).astype(volume.dtype)
        if not np.isfinite(stored):
            raise MagsegError(
                f"--fill-nonfinite {fill_nonfinite:g}: not a finite {volume.dtype} (the volume's "
                "dtype, kept in the store); use a value inside its range, e.g. 0"
            )
    chunks = default_chunks(volume.shape, chunks)
    nonfinite = NonFiniteCounter(fill_nonfinite, support["outside"] == "nan")

    def on_slab(z0, z1, slab):
        nonfinite(z0, z1, slab)
        if progress is not None:
            progress(z1 - z0)
        # Raised before the last slab is written, so the staged output is discarded whole.
        if z1 == volume.shape[0] and nonfinite.count and fill_nonfinite is None:
            raise MagsegError(
                f"{src}: {nonfinite.count} NaN/inf voxels (first at z,y,x={nonfinite.first}); "
                "pass --fill-nonfinite VALUE (e.g. 0) to replace them, or --outside nan if "
                "NaN marks the outside"
            )

    attrs = {k: v for k, v in volume.attrs.items() if _json_safe(v)}
    attrs["source"] = str(src)
    write_image_store(
        out, volume.data, chunks=chunks, codec_name=codec_name, like=volume,
        attrs={"source_attrs": attrs}, overwrite=overwrite, slab_callback=on_slab,
        image_attrs={STORED_ATTR: {k: v for k, v in support.items() if k != "source"}},
    )
    if nonfinite.count:
        log.warning("replaced %d NaN/inf voxels with %s", nonfinite.count, fill_nonfinite)
    return {"shape": tuple(volume.shape), "dtype": str(volume.dtype), "chunks": chunks,
            "nonfinite_replaced": nonfinite.count, "support": support}


def _json_safe(value) -> bool:
    import json

    try:
        json.dumps(value)
        return True
    except (TypeError, ValueError):
        return False
