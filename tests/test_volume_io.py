"""Each reader against an in-memory oracle, on odd shapes and uneven chunks, plus bad input."""

from __future__ import annotations

import dask.array as da
import h5py
import numpy as np
import pytest
import tifffile
import zarr
from PIL import Image

from magseg_hpc.errors import MagsegError
from magseg_hpc.volume.io import open_volume


def check(arr, oracle):
    assert arr.dims == ("z", "y", "x")
    assert isinstance(arr.data, da.Array), "volumes must be lazy"
    np.testing.assert_array_equal(arr.values, oracle)


@pytest.mark.parametrize("zarr_format", [2, 3])
def test_zarr_array_uneven_chunks(tmp_path, oracle_volume, zarr_format):
    z = zarr.create_array(tmp_path / "a.zarr", shape=oracle_volume.shape, chunks=(4, 10, 7),
                          dtype="float32", zarr_format=zarr_format)
    z[:] = oracle_volume
    arr = open_volume(tmp_path / "a.zarr")
    check(arr, oracle_volume)
    assert arr.data.chunks[0] == (4, 4, 3)


@pytest.mark.parametrize("zarr_format", [2, 3])
def test_zarr_group_variable_by_name(tmp_path, oracle_volume, zarr_format):
    g = zarr.open_group(tmp_path / "g.zarr", mode="w", zarr_format=zarr_format)
    g.create_array("recon", shape=oracle_volume.shape, chunks=(5, 16, 16), dtype="float32")[:] = (
        oracle_volume
    )
    g.create_array("other", shape=(3, 4, 5), dtype="uint16")
    check(open_volume(tmp_path / "g.zarr", var="recon"), oracle_volume)
    with pytest.raises(MagsegError, match="choose the variable.*other, recon"):
        open_volume(tmp_path / "g.zarr")
    with pytest.raises(MagsegError, match="no variable 'nope'; it has other, recon"):
        open_volume(tmp_path / "g.zarr", var="nope")


def test_zarr_read_is_lazy(tmp_path, oracle_volume):
    """Opening a volume must not read voxel chunks: delete them and open still works."""
    z = zarr.create_array(tmp_path / "a.zarr", shape=oracle_volume.shape, chunks=(4, 16, 16),
                          dtype="float32")
    z[:] = oracle_volume
    for chunk in (tmp_path / "a.zarr" / "c").rglob("*"):
        if chunk.is_file():
            chunk.write_bytes(b"garbage")
    arr = open_volume(tmp_path / "a.zarr")
    assert arr.shape == oracle_volume.shape
    with pytest.raises(Exception):  # noqa: B017 - zarr raises a codec error of its own
        arr.values  # noqa: B018 - reading now fails, proving nothing was read before


def test_tiff_multipage_and_folder(tmp_path, oracle_volume):
    tifffile.imwrite(tmp_path / "stack.tif", oracle_volume)
    check(open_volume(tmp_path / "stack.tif"), oracle_volume)
    folder = tmp_path / "slices"
    folder.mkdir()
    for i, s in enumerate(oracle_volume):
        tifffile.imwrite(folder / f"slice_{i:04d}.tif", s)
    check(open_volume(folder), oracle_volume)


def test_hdf5_dataset_path(tmp_path, oracle_volume):
    with h5py.File(tmp_path / "v.h5", "w") as f:
        f.create_dataset("exchange/data", data=oracle_volume, chunks=(3, 10, 10))
        f.create_dataset("exchange/theta", data=np.arange(5.0))
    check(open_volume(f"{tmp_path}/v.h5:/exchange/data"), oracle_volume)
    check(open_volume(tmp_path / "v.h5"), oracle_volume)  # the only 3D dataset
    with pytest.raises(MagsegError, match="no dataset 'nope'.*exchange/data"):
        open_volume(tmp_path / "v.h5", var="nope")


def test_npy(tmp_path, oracle_volume):
    np.save(tmp_path / "v.npy", oracle_volume)
    check(open_volume(tmp_path / "v.npy"), oracle_volume)


def test_gif_and_png_sweeps(tmp_path):
    rng = np.random.default_rng(1)
    frames = rng.integers(0, 256, size=(5, 23, 31), dtype=np.uint8)
    Image.fromarray(frames[0]).save(
        tmp_path / "sweep.gif", save_all=True,
        append_images=[Image.fromarray(f) for f in frames[1:]], optimize=False,
    )
    gif = open_volume(tmp_path / "sweep.gif")
    assert gif.shape == frames.shape
    pngs = tmp_path / "pngs"
    pngs.mkdir()
    for i, f in enumerate(frames):
        Image.fromarray(np.stack([f] * 3, -1)).save(pngs / f"{i:03d}.png")  # replicated RGB
    check(open_volume(pngs), frames)


def test_png_folder_with_mismatched_sizes(tmp_path):
    d = tmp_path / "pngs"
    d.mkdir()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(d / "0.png")
    Image.fromarray(np.zeros((8, 9), np.uint8)).save(d / "1.png")
    with pytest.raises(MagsegError, match="1.png: slice is 8x9 but the first slice is 8x8"):
        open_volume(d)


def test_png_folder_in_natural_order_and_mixed_dtypes_read_exactly(tmp_path):
    """1.png ... 12.png stack 1, 2, ..., 12 (not 1, 10, 11, 12, 2); a 16-bit slice among
    8-bit ones promotes the stack instead of wrapping its values modulo 256."""
    d = tmp_path / "pngs"
    d.mkdir()
    values = {i: (1000 + i if i == 10 else i) for i in range(1, 13)}
    for i, v in values.items():
        Image.fromarray(np.full((4, 5), v, np.uint16 if v > 255 else np.uint8)).save(
            d / f"{i}.png")
    arr = open_volume(d)
    assert arr.dtype == np.uint16
    check(arr, np.stack([np.full((4, 5), values[i], np.uint16) for i in range(1, 13)]))
    Image.fromarray(np.zeros((4, 5), np.uint8)).save(d / "01.png")
    with pytest.raises(MagsegError, match="01.png and 1.png number the same slice"):
        open_volume(d)


def test_slice_folder_rule_hidden_files_ignored_non_files_refused(tmp_path):
    """macOS's ._z000.png and .DS_Store are not slices (hidden names are skipped); a link to
    a slice is one; a folder named like a slice is refused, not read or silently dropped."""
    d = tmp_path / "pngs"
    d.mkdir()
    frames = np.arange(3 * 4 * 5, dtype=np.uint8).reshape(3, 4, 5)
    for i, f in enumerate(frames[:2]):
        Image.fromarray(f).save(d / f"z{i:03d}.png")
    Image.fromarray(frames[2]).save(tmp_path / "elsewhere.png")
    (d / "z002.png").symlink_to(tmp_path / "elsewhere.png")
    (d / "._z000.png").write_bytes(b"\x00\x05\x16\x07AppleDouble")
    (d / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    check(open_volume(d), frames)
    (d / "sub.png").mkdir()
    with pytest.raises(MagsegError, match=r"sub\.png: is not a regular file"):
        open_volume(d)


def test_multipage_tiff_with_mixed_dtypes_is_promoted(tmp_path):
    pages = [np.full((4, 5), 200, np.uint8), np.full((4, 5), 1000, np.uint16),
             np.full((4, 5), -3.5, np.float32)]
    for page in pages:
        tifffile.imwrite(tmp_path / "m.tif", page, append=True)
    arr = open_volume(tmp_path / "m.tif")
    assert arr.dtype == np.float32
    check(arr, np.stack(pages).astype(np.float32))


def test_singleton_axis_is_squeezed_with_a_warning(tmp_path, oracle_volume, caplog):
    np.save(tmp_path / "v.npy", oracle_volume[:, None])
    check(open_volume(tmp_path / "v.npy"), oracle_volume)
    assert "squeezed singleton axes" in caplog.text


@pytest.mark.parametrize(
    "array, message",
    [
        (np.zeros((4, 5), np.float32), "expected a 3D volume.*got 2D"),
        (np.zeros((2, 3, 4, 5), np.float32), "expected a 3D volume.*got 4D"),
        (np.zeros((2, 3, 4), np.complex64), "complex64 voxels are not supported"),
        (np.zeros((2, 3, 4), bool), "bool voxels are not supported"),
    ],
)
def test_bad_arrays(tmp_path, array, message):
    np.save(tmp_path / "bad.npy", array)
    with pytest.raises(MagsegError, match=message):
        open_volume(tmp_path / "bad.npy")


def test_missing_and_unknown_paths(tmp_path):
    with pytest.raises(MagsegError, match="no such file or directory"):
        open_volume(tmp_path / "missing.zarr")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(MagsegError, match="not a volume format"):
        open_volume(tmp_path / "notes.txt")
    (tmp_path / "fake.tif").write_text("not a tiff")
    with pytest.raises(MagsegError, match="not a readable TIFF"):
        open_volume(tmp_path / "fake.tif")
    (tmp_path / "empty").mkdir()
    with pytest.raises(MagsegError, match="holds no .tif or .png slices"):
        open_volume(tmp_path / "empty")
