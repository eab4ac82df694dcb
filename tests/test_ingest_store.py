"""ingest, info and the labelled output format, through the real CLI and zarr on disk."""

from __future__ import annotations

import logging
from multiprocessing import get_context

import numpy as np
import pytest
import tifffile
import xarray as xr

from magseg_hpc.classes import ClassTable
from magseg_hpc.volume.io import open_volume
from magseg_hpc.volume.store import (
    create_label_store,
    open_labels,
    set_complete,
    write_image_store,
    write_label_region,
)


def test_ingest_tiff_round_trip(tmp_path, oracle_volume, cli):
    tifffile.imwrite(tmp_path / "v.tif", oracle_volume)
    r = cli("ingest", tmp_path / "v.tif", tmp_path / "v.zarr", "--chunks", "4,16,8")
    assert r.returncode == 0, r.stderr
    ds = xr.open_zarr(tmp_path / "v.zarr")
    np.testing.assert_array_equal(ds["image"].values, oracle_volume)
    assert ds["image"].dims == ("z", "y", "x")
    assert ds["image"].encoding["chunks"] == (4, 16, 8)
    info = cli("info", tmp_path / "v.zarr")
    assert info.returncode == 0, info.stderr
    assert "z=11 x y=37 x x=29" in info.stdout and "ZstdCodec" in info.stdout


def test_ingest_refuses_existing_output_and_keeps_it(tmp_path, oracle_volume, cli):
    np.save(tmp_path / "v.npy", oracle_volume)
    assert cli("ingest", tmp_path / "v.npy", tmp_path / "v.zarr").returncode == 0
    before = sorted(p.name for p in (tmp_path / "v.zarr").rglob("*"))
    np.save(tmp_path / "w.npy", oracle_volume[:5])
    r = cli("ingest", tmp_path / "w.npy", tmp_path / "v.zarr")
    assert r.returncode == 2
    assert r.stderr.strip() == (
        f"magseg-hpc: error: {tmp_path / 'v.zarr'} already exists; pass --overwrite to replace it"
    )
    assert sorted(p.name for p in (tmp_path / "v.zarr").rglob("*")) == before
    assert cli("ingest", tmp_path / "w.npy", tmp_path / "v.zarr", "--overwrite").returncode == 0
    assert open_volume(tmp_path / "v.zarr").shape == (5, 37, 29)


def test_ingest_nan_is_refused_with_count_and_location(tmp_path, oracle_volume, cli):
    vol = oracle_volume.copy()
    vol[3, 4, 5] = np.nan
    vol[9, 0, 0] = np.inf
    np.save(tmp_path / "v.npy", vol)
    r = cli("ingest", tmp_path / "v.npy", tmp_path / "v.zarr", "--chunks", "2,37,29")
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "2 NaN/inf voxels (first at z,y,x=(3, 4, 5))" in lines[0]
    assert "--fill-nonfinite" in lines[0]
    assert not (tmp_path / "v.zarr").exists()
    assert not list(tmp_path.glob(".v.zarr*")), "no staged leftovers"
    r = cli("ingest", tmp_path / "v.npy", tmp_path / "v.zarr", "--fill-nonfinite", "0")
    assert r.returncode == 0, r.stderr
    out = open_volume(tmp_path / "v.zarr").values
    assert out[3, 4, 5] == 0 and out[9, 0, 0] == 0 and np.isfinite(out).all()


@pytest.mark.parametrize("chunks", ["0,4,4", "4,4", "a,b,c"])
def test_ingest_bad_chunks(tmp_path, oracle_volume, cli, chunks):
    np.save(tmp_path / "v.npy", oracle_volume)
    r = cli("ingest", tmp_path / "v.npy", tmp_path / "v.zarr", "--chunks", chunks)
    assert r.returncode == 2 and "expected three positive integers" in r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "v.zarr").exists()


def _write_slab(args):
    path, z0, z1, value = args
    shape = open_volume(path).shape
    write_label_region(path, (slice(z0, z1), slice(None), slice(None)),
                       np.full((z1 - z0, *shape[1:]), value, np.uint8))


def test_label_store_written_by_processes_reads_back(tmp_path, oracle_volume):
    like = xr.DataArray(oracle_volume, dims=("z", "y", "x"),
                        coords={"z": np.arange(11) * 0.5, "y": np.arange(37), "x": np.arange(29)})
    table = ClassTable.default()
    path = tmp_path / "out.zarr"
    create_label_store(path, like=like, class_table=table, provenance={"model": "m.pt"},
                       chunks=(3, 37, 29))
    with get_context("spawn").Pool(2) as pool:
        pool.map(_write_slab, [(str(path), z, min(z + 3, 11), z // 3) for z in range(0, 11, 3)])
    set_complete(path)
    ds = xr.open_zarr(path)
    expected = np.repeat([0, 1, 2, 3], 3)[:11]
    np.testing.assert_array_equal(ds["labels"].values[:, 0, 0], expected)
    np.testing.assert_allclose(ds["z"].values, np.arange(11) * 0.5)
    assert ds.attrs["class_table"] == table.to_dict()
    assert ds.attrs["provenance"] == {"model": "m.pt"}
    assert ds.attrs["magseg_hpc"]["complete"] is True
    labels, read_table = open_labels(path)
    assert read_table == table and labels.dtype == np.uint8


def test_label_store_is_an_ome_zarr_label_image(tmp_path, oracle_volume, caplog):
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Label, Reader

    like = xr.DataArray(oracle_volume, dims=("z", "y", "x"))
    create_label_store(tmp_path / "o.zarr", like=like, class_table=ClassTable.default(),
                       provenance={}, with_probabilities=True)
    write_label_region(tmp_path / "o.zarr", (slice(0, 11), slice(None), slice(None)),
                       np.full(oracle_volume.shape, 2, np.uint8),
                       np.full((3, *oracle_volume.shape), 0.25))
    with caplog.at_level(logging.ERROR):
        nodes = list(Reader(parse_url(str(tmp_path / "o.zarr")))())
    node = nodes[0]
    assert any(isinstance(s, Label) for s in node.specs)
    assert node.metadata["color"][2] == [1.0, 0.0, 0.0, 1.0]
    assert node.data[0].shape == oracle_volume.shape
    assert int(np.asarray(node.data[0]).max()) == 2
    probs = xr.open_zarr(tmp_path / "o.zarr")["probabilities"]
    assert probs.shape == (3, *oracle_volume.shape)
    np.testing.assert_allclose(probs.values, 64 / 255)  # quantised to uint8


def test_image_store_refuses_existing_and_keeps_it(tmp_path, oracle_volume):
    from magseg_hpc.errors import MagsegError

    write_image_store(tmp_path / "i.zarr", oracle_volume)
    with pytest.raises(MagsegError, match="already exists"):
        write_image_store(tmp_path / "i.zarr", oracle_volume[:2])
    assert open_volume(tmp_path / "i.zarr").shape == oracle_volume.shape


def test_every_chunk_has_a_file_and_a_lost_one_is_refused(tmp_path, caplog):
    """Image stores write chunks of zeros too, so a chunk without a file is a lost one: an
    input with one is refused naming it (zarr would read it as the fill value);
    absent_chunks_are_fill (--absent-chunks-are-fill) reads it so, with a warning."""
    import zarr

    from magseg_hpc.errors import MagsegError
    from magseg_hpc.volume.ingest import ingest

    volume = np.zeros((4, 8, 8), np.float32)
    volume[2:] = 1
    np.save(tmp_path / "v.npy", volume)
    ingest(tmp_path / "v.npy", tmp_path / "a.zarr", chunks=(2, 8, 8))
    image = zarr.open_group(str(tmp_path / "a.zarr"), mode="r")["image"]
    assert image.nchunks_initialized == image.nchunks == 2  # the chunk of zeros too
    (tmp_path / "a.zarr" / "image" / "c" / "1" / "0" / "0").unlink()
    with pytest.raises(MagsegError, match=r"1 of 2 chunks of 'image' have no file \(first: "
                       r"image/c/1/0/0\) and would read as the fill value 0.0"):
        ingest(tmp_path / "a.zarr", tmp_path / "b.zarr")
    assert not (tmp_path / "b.zarr").exists()
    with caplog.at_level(logging.WARNING):
        ingest(tmp_path / "a.zarr", tmp_path / "b.zarr", absent_chunks_are_fill=True)
    assert "1 of 2 chunks of 'image' have no file" in caplog.text
    np.testing.assert_array_equal(open_volume(tmp_path / "b.zarr").values, 0)


def _files(path):
    return {str(f.relative_to(path)): f.read_bytes() for f in path.rglob("*") if f.is_file()}


def test_ownership_is_the_manifest_not_an_inherited_attribute(tmp_path, oracle_volume):
    """A store a user writes from one of ours with xarray carries our attributes but not our
    manifest: --overwrite refuses it. One of ours that holds a user's extra file refuses too,
    naming it; one of ours as written is replaced."""
    from magseg_hpc.cli import main

    np.save(tmp_path / "v.npy", oracle_volume)
    ours = tmp_path / "ours.zarr"
    assert main(["ingest", str(tmp_path / "v.npy"), str(ours)]) == 0
    ds = xr.open_zarr(ours)
    copy = tmp_path / "copy.zarr"
    ds.assign(extra=ds["image"] * 2).to_zarr(copy)  # the user's derived store
    assert xr.open_zarr(copy).attrs["magseg_hpc"]["format"] == "magseg-hpc/image/1"
    before = _files(copy)
    assert main(["ingest", str(tmp_path / "v.npy"), str(copy), "--overwrite"]) == 2
    assert _files(copy) == before

    (ours / "notes.txt").write_text("mine")
    before = _files(ours)
    assert main(["ingest", str(tmp_path / "v.npy"), str(ours), "--overwrite"]) == 2
    assert _files(ours) == before
    (ours / "notes.txt").unlink()
    assert main(["ingest", str(tmp_path / "v.npy"), str(ours), "--overwrite"]) == 0


def test_overwrite_refusals_name_the_reason(tmp_path, oracle_volume, capsys):
    from magseg_hpc.cli import main

    np.save(tmp_path / "v.npy", oracle_volume)
    ours = tmp_path / "ours.zarr"
    assert main(["ingest", str(tmp_path / "v.npy"), str(ours)]) == 0
    (ours / "notes.txt").write_text("mine")
    capsys.readouterr()
    assert main(["ingest", str(tmp_path / "v.npy"), str(ours), "--overwrite"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0
    assert "holds entries magseg-hpc did not write (notes.txt)" in err
