"""Open a volume from any supported format as a lazy ``xarray.DataArray`` with dims (z, y, x).

Formats: zarr arrays and groups (format 2 and 3), TIFF (one multi-page file or a folder of
slices), HDF5 (``file.h5:/path/to/dataset`` or ``var=``), NPY, and image sweeps (an animated
GIF or a folder of PNGs, one frame a slice, as the original study shared its volumes).

Everything except GIF is read lazily: slices or chunks are read when dask computes them, and
the dask graph holds only paths, so it can be shipped to distributed workers.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import stat
import warnings
from collections.abc import Iterator
from pathlib import Path

import dask
import dask.array as da
import numpy as np
import xarray as xr
import zarr

from magseg_hpc.axes import AXES as DIMS
from magseg_hpc.errors import ERRNO_FIXES, USER_ERRNOS, MagsegError
from magseg_hpc.paths import HDF5_SUFFIXES, split_hdf5, volume_file

log = logging.getLogger(__name__)

ZARR_MARKERS = ("zarr.json", ".zarray", ".zgroup", ".zattrs")
TIFF_SUFFIXES = (".tif", ".tiff")
SUPPORTED = "zarr, TIFF (file or folder), HDF5 (file.h5:/dataset), NPY, GIF or a folder of PNGs"


def open_volume(
    path: str | os.PathLike, var: str | None = None, *, prefer: str | None = None
) -> xr.DataArray:
    """Open ``path`` as a 3D DataArray with dims (z, y, x), backed by dask.

    ``var`` names the variable of a zarr group (default ``image``, else its only array) or the
    dataset of an HDF5 file; it must exist. ``prefer`` is a soft default instead: the variable
    read when the store has it, otherwise the store's only 3D array (a plain zarr array, NPY,
    TIFF or an HDF5 file with one 3D dataset needs no name).
    """
    text = str(path)
    h5_path, h5_var = split_hdf5(text)
    if h5_path is not None:
        text, var = h5_path, var or h5_var
    p = Path(text)
    if not p.exists():
        raise MagsegError(f"{p}: no such file or directory; check the path")
    suffix = p.suffix.lower()
    if p.is_dir() and any((p / m).exists() for m in ZARR_MARKERS):
        arr = _open_zarr(p, var, prefer)
    elif p.is_dir():
        arr = _open_slice_folder(p)
    elif suffix in TIFF_SUFFIXES:
        arr = _open_tiff_file(p)
    elif suffix in HDF5_SUFFIXES:
        arr = _open_hdf5(p, var, prefer)
    elif suffix == ".npy":
        arr = _open_npy(p)
    elif suffix in (".gif", ".png"):
        arr = _open_image_sweep(p)
    else:
        raise MagsegError(f"{p}: not a volume format magseg-hpc reads; use {SUPPORTED}")
    return _as_zyx(arr, p)


# What a damaged or truncated file raises while its data are read (zarr/numcodecs decode
# errors are RuntimeError or ValueError; tifffile, PIL, h5py and numpy raise ValueError/OSError).
READ_ERRORS = (RuntimeError, ValueError, OSError, EOFError, IndexError)


@contextlib.contextmanager
def reading(source, problem: str = "cannot read its voxels",
            fix: str = "the file is damaged or truncated, re-export or re-copy it",
            ) -> Iterator[None]:
    """Turn a failure while reading ``source``'s voxels into one line naming the file."""
    try:
        yield
    except MagsegError:
        raise
    except READ_ERRORS as e:
        if isinstance(e, OSError) and e.errno in USER_ERRNOS:
            raise  # a permission or disk problem, reported as such by the CLI
        fix = (ERRNO_FIXES.get(e.errno) if isinstance(e, OSError) else None) or fix
        raise MagsegError(f"{source}: {problem} ({_short(e)}); {fix}") from e


def _short(e: Exception) -> str:
    return f"{type(e).__name__}: {' '.join(str(e).split())[:160]}"


def _as_zyx(arr: xr.DataArray, path: Path) -> xr.DataArray:
    """Check dtype and rank and name the axes z, y, x (squeezing singleton extra axes)."""
    # zarr stores numbers of up to 8 bytes: float128 (long double) has no zarr type
    if arr.dtype.kind == "c" or arr.dtype == bool or arr.dtype.itemsize > 8:
        raise MagsegError(
            f"{path}: {arr.dtype} voxels are not supported; convert to float32, uint8 or uint16"
        )
    if arr.dtype.kind not in "uif":
        raise MagsegError(f"{path}: dtype {arr.dtype} is not a number; store intensities")
    if arr.ndim > 3:
        singletons = [d for d, n in zip(arr.dims, arr.shape) if n == 1]
        keep = arr.ndim - 3
        if len(singletons) >= keep:
            log.warning("%s: squeezed singleton axes %s to get a 3D volume",
                        path, singletons[:keep])
            arr = arr.isel({d: 0 for d in singletons[:keep]})
    if arr.ndim != 3:
        raise MagsegError(
            f"{path}: expected a 3D volume (z, y, x), got {arr.ndim}D with shape {arr.shape}; "
            "stack 2D slices into one volume or select a 3D variable"
        )
    if tuple(arr.dims) != DIMS:
        if set(arr.dims) == set(DIMS):
            arr = arr.transpose(*DIMS)
        else:
            arr = arr.rename(dict(zip(arr.dims, DIMS)))
    arr.attrs.setdefault("source", str(path))
    return arr


def soft_var(var: str | None, default: str) -> dict:
    """``open_volume`` keywords for a config value whose default name is only a preference:
    the default (e.g. ``labels``) is read when present, else the store's only array."""
    return {"prefer": default} if var in (None, default) else {"var": var}


def _open_zarr(path: Path, var: str | None, prefer: str | None = None) -> xr.DataArray:
    try:
        node = zarr.open(store=str(path), mode="r")
    except Exception as e:  # zarr raises many types for broken metadata
        raise MagsegError(f"{path}: not a readable zarr store ({e})") from e
    if isinstance(node, zarr.Array):
        if var is not None:
            raise MagsegError(f"{path}: is a single zarr array, it has no variable {var!r}")
        return _wrap_zarr_array(node)
    # 1-D arrays are coordinates, not variables.
    arrays = sorted(name for name, a in node.arrays() if a.ndim > 1)
    if var is None and prefer is not None:
        big = [a for a in arrays if node[a].ndim == 3]
        var = prefer if prefer in arrays else (big[0] if len(big) == 1 else None)
        if var is None:
            raise MagsegError(
                f"{path}: no variable {prefer!r} and not a single array; choose the variable "
                f"with --var; it has {', '.join(arrays) or 'no arrays'}"
            )
    if var is None:
        big = [a for a in arrays if node[a].ndim == 3]
        preferred = [a for a in ("image", "labels") if a in big]
        var = preferred[0] if preferred else (big[0] if len(big) == 1 else None)
        if var is None:
            raise MagsegError(
                f"{path}: choose the variable to read with --var; it has {', '.join(arrays)}"
            )
    if var not in arrays:
        raise MagsegError(
            f"{path}: no variable {var!r}; it has {', '.join(arrays) or 'no arrays'}"
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # unconsolidated stores are fine
            ds = xr.open_zarr(str(path), consolidated=None, chunks={})
        if var in ds.data_vars:
            return ds[var]
    except (KeyError, ValueError, TypeError, zarr.errors.BaseZarrError) as e:
        # e.g. a plain zarr group without xarray dimension names: say so when 1-D arrays
        # (coordinates, probably) are dropped
        coords = sorted(name for name, a in node.arrays() if a.ndim == 1)
        (log.warning if coords else log.debug)(
            "%s: read %r as a plain zarr array%s (%s: %s)", path, var,
            f", without the coordinates {', '.join(coords)}" if coords else "",
            type(e).__name__, " ".join(str(e).split())[:120])
    return _wrap_zarr_array(node[var])


def _wrap_zarr_array(a: zarr.Array) -> xr.DataArray:
    names = getattr(a.metadata, "dimension_names", None) or a.attrs.get("_ARRAY_DIMENSIONS")
    data = da.from_zarr(a)
    dims = tuple(names) if names and len(names) == a.ndim and all(names) else None
    # named like the group's variable (as xarray names it), so check_chunk_files finds it
    return xr.DataArray(data, dims=dims, attrs=dict(a.attrs),
                        name=a.path.rsplit("/", 1)[-1] or None)


ALLOW_ABSENT_FLAG = "--absent-chunks-are-fill"


def check_chunk_files(source, var: str | None = None, allow_absent: bool = False) -> None:
    """Refuse an input zarr array with chunks that have no file: zarr reads those as the fill
    value, silently, so a store that lost chunk files would be segmented as zeros. A store
    written without empty chunks (zarr's default) looks the same; nothing tells the two apart
    (``allow_absent``: the user says so; a warning only).
    Cheap: one listing of the array's files (``nchunks_initialized``)."""
    path = volume_file(source)
    if not (path.is_dir() and any((path / m).exists() for m in ZARR_MARKERS)):
        return
    try:
        node = zarr.open(store=str(path), mode="r")
        arr = node if isinstance(node, zarr.Array) else node[str(var)]
        total, present = arr.nchunks, arr.nchunks_initialized
    except (KeyError, OSError, ValueError, TypeError, zarr.errors.BaseZarrError) as e:
        log.debug("%s: chunk count unavailable (%s)", source, e)  # open_volume had the say
        return
    if present >= total:
        return
    if allow_absent:
        log.warning("%s: %d of %d chunks of %r have no file and are read as the fill value %s",
                    source, total - present, total, arr.path or "the array", arr.fill_value)
        return
    raise MagsegError(
        f"{source}: {total - present} of {total} chunks of {arr.path or 'the array'!r} have no "
        f"file (first: {_first_absent_chunk(path, arr)}) and would read as the fill value "
        f"{arr.fill_value}; the store lost chunk files (compare its file count with the "
        f"original's and copy it again), or, if its writer skipped chunks of only "
        f"{arr.fill_value}, rewrite it with `magseg-hpc ingest {source} FULL.zarr "
        f"{ALLOW_ABSENT_FLAG}`")


def _first_absent_chunk(path: Path, arr: zarr.Array) -> str:
    """The first chunk (shard, for sharded arrays) file that is not a regular file."""
    unit = getattr(arr, "shards", None) or arr.chunks
    grid = [-(-n // c) for n, c in zip(arr.shape, unit)]
    for index in np.ndindex(*grid):
        key = Path(arr.path) / arr.metadata.encode_chunk_key(index)
        if not (path / key).is_file():
            link = " (a broken or looping link)" if (path / key).is_symlink() else ""
            return f"{key}{link}"
    return "unknown"


class _LazyFileArray:
    """Array-like that opens its file on every read, so dask graphs pickle only the path."""

    def __init__(self, path: str, key: str | None, shape, dtype, kind: str):
        self.path, self.key, self.kind = path, key, kind
        self.shape, self.dtype, self.ndim = tuple(shape), np.dtype(dtype), len(shape)

    def __getitem__(self, index):
        with reading(self.path):  # whoever computes the graph gets one line naming the file
            if self.kind == "hdf5":
                import h5py

                with h5py.File(self.path, "r") as f:
                    return f[self.key][index]
            # Copy out of the memory map and drop it, so read pages do not stay resident.
            mm = np.load(self.path, mmap_mode="r")
            out = np.array(mm[index])
            del mm
            return out


def slab_chunks(shape, itemsize: int, target_bytes: int = 64 * 2**20) -> tuple:
    """Chunks of whole slices (~64 MiB each) for formats that have no chunking of their own."""
    if len(shape) < 2:
        return ("auto",) * len(shape)
    slice_bytes = max(1, int(np.prod(shape[1:])) * itemsize)
    return (max(1, target_bytes // slice_bytes), *shape[1:])


def _open_hdf5(path: Path, var: str | None, prefer: str | None = None) -> xr.DataArray:
    import h5py

    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise MagsegError(f"{path}: not a readable HDF5 file ({e})") from e
    with f:
        names: list[str] = []
        f.visititems(lambda n, o: names.append(n) if isinstance(o, h5py.Dataset) else None)
        if var is None and prefer in names:
            var = prefer
        if var is None:
            big = [n for n in names if f[n].ndim >= 3]
            if len(big) != 1:
                raise MagsegError(
                    f"{path}: choose the dataset with {path}:/NAME or --var; "
                    f"it has {', '.join(names) or 'no datasets'}"
                )
            var = big[0]
        var = var.lstrip("/")
        if var not in names:
            raise MagsegError(f"{path}: no dataset {var!r}; it has {', '.join(names)}")
        ds = f[var]
        chunks = ds.chunks or slab_chunks(ds.shape, ds.dtype.itemsize)
        lazy = _LazyFileArray(str(path), var, ds.shape, ds.dtype, "hdf5")
        attrs = {k: _plain(v) for k, v in ds.attrs.items()}
    return xr.DataArray(da.from_array(lazy, chunks=chunks, asarray=True), attrs=attrs)


def _plain(value):
    return value.tolist() if isinstance(value, np.ndarray | np.generic) else value


def _open_npy(path: Path) -> xr.DataArray:
    try:
        mm = np.load(path, mmap_mode="r")
    except (ValueError, OSError, EOFError) as e:
        raise MagsegError(f"{path}: not a readable .npy file ({e or 'empty file'})") from e
    lazy = _LazyFileArray(str(path), None, mm.shape, mm.dtype, "npy")
    return xr.DataArray(da.from_array(lazy, chunks=slab_chunks(mm.shape, mm.itemsize)))


def _read_tiff_page(path: str, page: int) -> np.ndarray:
    import tifffile

    with tifffile.TiffFile(path) as tif:
        return tif.pages[page].asarray()


def _read_png(path: str) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        return _grey(im)


def _grey(im) -> np.ndarray:
    """Single-channel pixels; colour images (e.g. replicated-RGB exports) become luminance."""
    if im.mode in ("I;16", "I;16B", "I", "F", "L"):
        return np.asarray(im)
    return np.asarray(im.convert("L"))


def _read_as(fn, args, dtype) -> np.ndarray:
    with reading(args[0]):  # the slice file, named in the one line whoever computes this
        return fn(*args).astype(dtype, copy=False)


def _stack_slices(readers: list, shape, dtypes: list) -> da.Array:
    """Slices of possibly mixed dtypes stacked in the one that holds them all exactly
    (uint8 and uint16 slices: uint16), never wrapped to the first slice's."""
    dtype = np.result_type(*dtypes)
    slices = [da.from_delayed(dask.delayed(_read_as)(fn, a, dtype), shape=shape, dtype=dtype)
              for fn, a in readers]
    if len(set(dtypes)) > 1:
        log.info("slices of %s read as %s", ", ".join(sorted({str(d) for d in dtypes})), dtype)
    return da.stack(slices)


def _natural_key(name: str) -> tuple:
    """Digit runs compare as numbers: 2.png before 10.png."""
    return tuple(int(part) if part.isdigit() else part.lower()
                 for part in re.split(r"(\d+)", name))


def natural_order(files: list[Path]) -> list[Path]:
    """``files`` in natural name order; names that order alike (1.png, 01.png) are refused."""
    keys: dict[tuple, Path] = {}
    for f in files:
        key = _natural_key(f.name)
        if key in keys:
            raise MagsegError(
                f"{f.parent}: {keys[key].name} and {f.name} number the same slice; rename "
                "one so that every slice has its own number"
            )
        keys[key] = f
    return [keys[k] for k in sorted(keys)]


class _Collect(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(" ".join(record.getMessage().split()))


def _open_tiff_file(path: Path) -> xr.DataArray:
    import tifffile

    # tifffile logs what it finds wrong; collected here, it becomes part of our one message
    notes = _Collect()
    tiff_log = logging.getLogger("tifffile")
    tiff_log.addHandler(notes)
    propagate, tiff_log.propagate = tiff_log.propagate, False
    try:
        with tifffile.TiffFile(path) as tif:
            series = tif.series[0]
            if len(series.shape) >= 3 and len(tif.pages) == 1:
                return xr.DataArray(da.from_array(series.asarray(), chunks="auto"))
            first = tif.pages[0]
            shape, n = first.shape, len(tif.pages)
            dtypes = [page.dtype for page in tif.pages]
    except (tifffile.TiffFileError, OSError, IndexError, ValueError, EOFError) as e:
        raise MagsegError(f"{path}: not a readable TIFF file ({e})") from e
    finally:
        tiff_log.removeHandler(notes)
        tiff_log.propagate = propagate
    if notes.messages:
        log.warning("%s: %s; read %d pages (the file may be truncated)", path,
                    notes.messages[0], n)
    readers = [(_read_tiff_page, (str(path), i)) for i in range(n)]
    return xr.DataArray(_stack_slices(readers, shape, dtypes))


def slice_files(folder: Path, suffixes: tuple[str, ...]) -> list[Path]:
    """The slice files of ``folder`` by one rule: names ending in ``suffixes``, hidden names
    (starting with '.': macOS ``._x.png`` and ``.DS_Store``, editors' temporary files) left
    out, and each one a regular file (a link to one is fine); anything else is refused."""
    files = []
    for f in folder.iterdir():
        if f.name.startswith(".") or f.suffix.lower() not in suffixes:
            continue
        try:
            regular = stat.S_ISREG(f.stat().st_mode)
        except OSError as e:  # a broken or looping link
            raise MagsegError(f"{f}: cannot open it ({e.strerror}); slices must be regular "
                              "files: fix the link or move it out of the folder") from None
        if not regular:
            raise MagsegError(f"{f}: is not a regular file (a folder?); slices must be regular "
                              "files: move it out of the folder")
        files.append(f)
    return files


def _slice_header(path: Path):
    """A slice that cannot be opened is one line naming it (not a traceback)."""
    return reading(path, "not a readable slice image",
                   "re-export it or move it out of the folder")


def _open_slice_folder(path: Path) -> xr.DataArray:
    files = natural_order(slice_files(path, TIFF_SUFFIXES + (".png",)))
    if not files:
        raise MagsegError(
            f"{path}: folder holds no .tif or .png slices and is not a zarr store; use {SUPPORTED}"
        )
    kinds = {f.suffix.lower() in TIFF_SUFFIXES for f in files}
    if len(kinds) > 1:
        raise MagsegError(f"{path}: folder mixes TIFF and PNG slices; keep one kind of slice")
    with _slice_header(files[0]):
        first = _read_tiff_page(str(files[0]), 0) if True in kinds else _read_png(str(files[0]))
    if first.ndim != 2:
        raise MagsegError(f"{files[0]}: expected 2D slices, got shape {first.shape}")
    fn = _read_tiff_page if True in kinds else _read_png
    readers = [(fn, (str(f), 0) if fn is _read_tiff_page else (str(f),)) for f in files]
    dtypes = _check_slice_shapes(files, first.shape)
    return xr.DataArray(_stack_slices(readers, first.shape, dtypes))


# PIL modes as the pixels _grey returns them (colour modes become 8-bit luminance)
_PIL_DTYPES = {"I;16": np.uint16, "I;16B": np.uint16, "I": np.int32, "F": np.float32}


def _check_slice_shapes(files: list[Path], shape) -> list[np.dtype]:
    """Headers only: a stack of slices with different sizes is refused before any reading;
    returns each slice's dtype."""
    from PIL import Image

    dtypes = []
    for f in files:
        with _slice_header(f):
            if f.suffix.lower() == ".png":
                with Image.open(f) as im:
                    size = (im.height, im.width)
                    dtypes.append(np.dtype(_PIL_DTYPES.get(im.mode, np.uint8)))
            else:
                import tifffile

                with tifffile.TiffFile(f) as tif:
                    size = tif.pages[0].shape[:2]
                    dtypes.append(tif.pages[0].dtype)
        if tuple(size) != tuple(shape[:2]):
            raise MagsegError(
                f"{f}: slice is {size[0]}x{size[1]} but the first slice is {shape[0]}x{shape[1]}; "
                "all slices of a volume must have the same size"
            )
    return dtypes


def _open_image_sweep(path: Path) -> xr.DataArray:
    """An animated GIF (or a single PNG): one frame a slice. GIFs are small, read eagerly."""
    from PIL import Image, ImageSequence, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            frames = [_grey(frame.copy()) for frame in ImageSequence.Iterator(im)]
    except (UnidentifiedImageError, OSError) as e:
        raise MagsegError(f"{path}: not a readable image ({e})") from e
    return xr.DataArray(da.from_array(np.stack(frames), chunks="auto"))
