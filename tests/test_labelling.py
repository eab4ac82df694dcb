"""The labelling loop on a phantom: export slices, paint them as a labelling tool saves them,
import them sparsely, train on exactly those slices, ask the model which slices to label next
and export those. Plus label arrays as tools save them, plain arrays everywhere, bad inputs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
import zarr
from conftest import TINY_MODEL
from PIL import Image

from magseg_hpc.classes import IGNORE_LABEL, ClassTable
from magseg_hpc.cli import main
from magseg_hpc.config import config_from_dict
from magseg_hpc.data.labelling import (
    SAMPLE_FLOOR,
    index_from_name,
    intensity_window,
    read_slice_list,
    to_uint8,
    write_slice_list,
)
from magseg_hpc.data.phantom import make_phantom, write_phantom
from magseg_hpc.data.splits import make_splits, read_split
from magseg_hpc.errors import MagsegError
from magseg_hpc.segment.suggest import pick_spread
from magseg_hpc.train import run_training
from magseg_hpc.volume.support import NONE, detect_support

TABLE = ClassTable.default()
SHAPE = (16, 32, 32)


def run(capsys, *args) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def tiny(volume, **data) -> dict:
    return {
        "name": "tiny-labels", "seed": 0, "model": TINY_MODEL,
        "data": {"volume": str(volume), "n_labeled": 3, "n_val": 2, **data},
        "train": {"batch_size": 2, "crop_size": 32, "epochs": 2, "max_iters": 2,
                  "checkpoint_every": 2, "eval_every": 2, "log_every": 1, "lr": 0.01,
                  "ema_decay": 0.99, "device": "cpu", "threads": 1},
    }


def paint(truth: np.ndarray, path: Path, n_edge: int = 5) -> np.ndarray:
    """Save labels as a labelling tool does: an RGB PNG in the table's colours, with a few
    anti-aliased pixels (blends of two colours) on class edges. Returns what import should
    read back (the blended pixels 255)."""
    colors = np.asarray(TABLE.colors, np.uint8)
    rgb = colors[truth].copy()
    expected = truth.astype(np.uint8).copy()
    ys, xs = np.nonzero(truth[:, :-1] != truth[:, 1:])
    for y, x in list(zip(ys, xs, strict=True))[:n_edge]:
        a, b = colors[truth[y, x]].astype(int), colors[truth[y, x + 1]].astype(int)
        rgb[y, x] = ((a + b) // 2).astype(np.uint8)
        expected[y, x] = IGNORE_LABEL
    Image.fromarray(rgb, "RGB").save(path)
    return expected


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("phantoms")
    train, val = root / "train.zarr", root / "val.zarr"
    write_phantom(train, make_phantom(SHAPE, seed=0, n_angles=20))
    write_phantom(val, make_phantom(SHAPE, seed=1, n_angles=20))
    return train, val


# --- the loop --------------------------------------------------------------------------------


def test_the_labelling_loop(phantoms, tmp_path, capsys, caplog):
    train_vol, val_vol = phantoms
    truth = xr.open_zarr(train_vol)["labels"].values
    image = xr.open_zarr(train_vol)["image"].values

    # 1. export 6 slices to paint
    shots = tmp_path / "to_paint"
    code, out, err = run(capsys, "export-slices", train_vol, shots, "--n", 6)
    assert code == 0, err
    manifest = json.loads((shots / "manifest.json").read_text())
    indices = manifest["indices"]
    assert len(indices) == 6 and manifest["axis"] == "z" and manifest["shape"] == list(SHAPE)
    assert manifest["files"] == [f"z{i:05d}.png" for i in indices]
    assert manifest["class_table"] == TABLE.to_dict()
    for i, name in zip(indices, manifest["files"], strict=True):
        with Image.open(shots / name) as im:
            assert im.mode == "L" and im.size == (SHAPE[2], SHAPE[1])
            np.testing.assert_array_equal(np.asarray(im), to_uint8(image[i], manifest["window"]))

    # 2. paint them from the truth, as a labelling tool saves them
    masks = tmp_path / "masks"
    masks.mkdir()
    expected = {i: paint(truth[i], masks / f"z{i:05d}.png") for i in indices}

    # 3. import sparsely: the manifest is the colour table
    labels = tmp_path / "labels.zarr"
    code, out, err = run(capsys, "import-masks", masks, labels, "--colors",
                         shots / "manifest.json", "--like", train_vol)
    assert code == 0, err
    assert f"labelled z slices (6 of {SHAPE[0]}): {', '.join(map(str, indices))}" in out
    assert "30 pixels" in caplog.text and "set to 255" in caplog.text  # the anti-aliased ones
    got = xr.open_zarr(labels)["labels"].values
    for z in range(SHAPE[0]):
        if z in expected:
            np.testing.assert_array_equal(got[z], expected[z])
        else:
            assert (got[z] == IGNORE_LABEL).all()

    # 4. train: the labelled split is exactly the painted slices
    run_dir = tmp_path / "run"
    cfg = config_from_dict(tiny(train_vol, label_volume=str(labels), val_volume=str(val_vol)))
    summary = run_training(cfg, run_dir)
    assert summary["iterations"] == 2
    assert read_split(run_dir / "splits/labeled.txt") == [str(i) for i in indices]
    unlabelled = read_split(run_dir / "splits/unlabeled.txt")
    assert sorted(map(int, unlabelled)) == [z for z in range(SHAPE[0]) if z not in indices]
    assert read_split(run_dir / "splits/val.txt") == ["0", "15"]  # of the validation volume

    # 5. which slices next? not the labelled ones; export-slices accepts the list
    suggestions = tmp_path / "next.txt"
    code, out, err = run(capsys, "suggest-slices", train_vol, "--model", run_dir / "best.pt",
                         "--n", 3, "--labels", labels, "-o", suggestions, "--in-process",
                         "--workers", 1, "--threads-per-worker", 1,
                         "--dashboard-address", "127.0.0.1:0")
    assert code == 0, err
    picked, axis = read_slice_list(suggestions)
    assert axis == "z" and len(picked) == 3 and not set(picked) & set(indices)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".magseg-suggest")]
    more = tmp_path / "more"
    code, out, err = run(capsys, "export-slices", train_vol, more, "--suggestions", suggestions)
    assert code == 0, err
    assert sorted(f.name for f in more.glob("*.png")) == sorted(f"z{i:05d}.png" for i in picked)


# --- pieces ----------------------------------------------------------------------------------


def test_window_leaves_out_a_masked_zero_background():
    rng = np.random.default_rng(0)
    inside = rng.uniform(10, 20, size=2000)
    values = np.concatenate([np.zeros(8000), inside])
    support = detect_support(values.reshape(1, 100, 100))
    w = intensity_window(values, support)
    assert w["masked"] and w["low"] > 10 and w["high"] < 20
    assert not intensity_window(inside, NONE)["masked"]
    assert to_uint8(np.array([0.0, w["low"], w["high"], 1e9]), w).tolist() == [0, 0, 255, 255]


def test_masked_export_tells_a_zero_dark_domain_from_the_outside(tmp_path, capsys):
    """A disc sample, masked to 0 outside, crossed edge to edge by a dark domain clipped to 0
    too: in the picture the outside is black, the domain dark grey, the rest brighter."""
    yy, xx = np.mgrid[:40, :40]
    disc = (yy - 20) ** 2 + (xx - 20) ** 2 < 15**2
    stripe = np.abs(yy - 20) < 4
    bright = disc & ~stripe
    vol = np.zeros((4, 40, 40), np.float32)
    vol[:, bright] = 200.0 + np.linspace(0, 10, int(bright.sum()))
    np.save(tmp_path / "vol.npy", vol)
    out = tmp_path / "shots"
    code, _, err = run(capsys, "export-slices", tmp_path / "vol.npy", out, "--slices", "1")
    assert code == 0, err
    m = json.loads((out / "manifest.json").read_text())
    assert m["grey_levels"]["0"].startswith("outside the sample support")
    assert "dark is domain_minus" in m["grey_levels"][f"{SAMPLE_FLOOR}-255"]
    with Image.open(out / "z00001.png") as im:
        pixels = np.asarray(im)
    assert (pixels[(yy - 20) ** 2 + (xx - 20) ** 2 >= 16**2] == 0).all()  # hull: +-1 px
    assert (pixels[stripe & (np.abs(xx - 20) < 14)] == SAMPLE_FLOOR).all()
    assert (pixels[bright] >= SAMPLE_FLOOR).all() and np.median(pixels[bright]) > 128


def test_export_along_y_as_tiff_from_a_plain_npy(tmp_path, capsys):
    import tifffile

    vol = np.zeros((8, 20, 12), np.float32)
    vol[:, 5:15, 3:9] = np.linspace(1, 2, 8 * 10 * 6).reshape(8, 10, 6)
    np.save(tmp_path / "vol.npy", vol)
    out = tmp_path / "shots"
    code, _, err = run(capsys, "export-slices", tmp_path / "vol.npy", out, "--slices", "7,2,7",
                       "--axis", "y", "--format", "tiff")
    assert code == 0, err
    m = json.loads((out / "manifest.json").read_text())
    assert m["indices"] == [2, 7] and m["axis"] == "y" and m["window"]["masked"]
    img = tifffile.imread(out / "y00007.tif")
    assert img.dtype == np.uint8 and img.shape == (8, 12)


def test_slice_lists_and_names(tmp_path):
    path = tmp_path / "list.txt"
    write_slice_list(path, [5, 1], axis="x", scores=[0.5, 0.25], header="hello")
    assert read_slice_list(path) == ([5, 1], "x")
    assert index_from_name(Path("z00042.png")) == ("z", 42)
    assert index_from_name(Path("z00042_mask.png")) == ("z", 42)
    assert index_from_name(Path("slice_17.png")) == (None, 17)
    with pytest.raises(MagsegError, match="no slice index"):
        index_from_name(Path("mask.png"))
    path.write_text("# axis: z\n12\nabc\n")
    with pytest.raises(MagsegError, match="not a slice index"):
        read_slice_list(path)
    path.write_text("# Axis: X\n3\n1\n")  # upper case is x, not the default z
    assert read_slice_list(path) == ([3, 1], "x")
    path.write_text("# axis: w\n3\n")
    with pytest.raises(MagsegError, match="names no axis"):
        read_slice_list(path)


def test_sparse_splits():
    s = make_splits(20, n_labeled=99, n_val=2, labelled=[1, 5, 9, 13, 17])
    assert s == {"labeled": [1, 5, 9], "val": [13, 17],
                 "unlabeled": [i for i in range(20) if i not in (1, 5, 9, 13, 17)]}
    s = make_splits(20, n_labeled=1, n_val=2, labelled=[1, 5, 9, 13, 17], val_selection="even")
    assert s["labeled"] == [5, 9, 13] and s["val"] == [1, 17]
    s = make_splits(20, n_labeled=1, n_val=0, labelled=[3, 4], n_val_slices=10,
                    val_labelled=[2, 6])
    assert s["labeled"] == [3, 4] and s["val"] == [2, 6] and len(s["unlabeled"]) == 18
    with pytest.raises(MagsegError, match="leaving none to train on"):
        make_splits(20, n_labeled=1, n_val=2, labelled=[1, 5])
    with pytest.raises(MagsegError, match="carries no labels"):
        make_splits(20, n_labeled=1, n_val=0, labelled=[])


def test_pick_spread_keeps_a_gap_and_skips_labelled():
    scores = np.array([0.1, 0.9, 0.85, 0.8, 0.2, 0.3, np.nan, 0.7, 0.05, 0.4])
    assert pick_spread(scores, 3, min_gap=2) == [1, 3, 7]
    assert pick_spread(scores, 3, exclude=[3], min_gap=2) == [1, 7, 9]
    assert pick_spread(scores, 3, min_gap=9) == [1, 2, 3]  # relaxed when too few are left
    assert 6 not in pick_spread(scores, 9, min_gap=1)  # NaN: no sample, never suggested


# --- label arrays as tools save them ---------------------------------------------------------


def test_import_a_napari_label_array(tmp_path, capsys, caplog):
    """napari: 0 = unlabelled, so the classes are painted 1, 2, 3 (3 = background)."""
    arr = np.zeros((6, 10, 12), np.int32)
    arr[1] = 3
    arr[1, 2:5, 2:5] = 1
    arr[4, :, :6] = 2
    arr[4, 0, 0] = 7  # a stray value
    np.save(tmp_path / "napari.npy", arr)
    out = tmp_path / "labels.zarr"
    code, text, err = run(capsys, "import-masks", tmp_path / "napari.npy", out,
                          "--unlabelled-value", 0, "--class-values", "3,1,2")
    assert code == 0, err
    assert "labelled z slices (2 of 6): 1, 4" in text and "1 pixels" in caplog.text
    got = xr.open_zarr(out)["labels"].values
    assert (got[[0, 2, 3, 5]] == IGNORE_LABEL).all()
    assert (got[1, 2:5, 2:5] == 1).all() and got[1, 0, 0] == 0
    assert (got[4, 1:, :6] == 2).all() and got[4, 0, 0] == IGNORE_LABEL
    assert (got[4, :, 6:] == IGNORE_LABEL).all()

    # a plain zarr array works the same; the unlabelled value may not be a class value
    z = zarr.create_array(str(tmp_path / "plain.zarr"), shape=arr.shape, dtype="int32",
                          chunks=(2, 10, 12))
    z[:] = arr
    code, _, err = run(capsys, "import-masks", tmp_path / "plain.zarr", tmp_path / "b.zarr",
                       "--unlabelled-value", 0)
    assert code == 2 and "also the value of class background" in err
    assert not (tmp_path / "b.zarr").exists()
    code, _, err = run(capsys, "import-masks", tmp_path / "plain.zarr", tmp_path / "b.zarr",
                       "--unlabelled-value", 0, "--class-values", "3,1,2")
    assert code == 0, err
    np.testing.assert_array_equal(xr.open_zarr(tmp_path / "b.zarr")["labels"].values, got)


# --- plain arrays everywhere -----------------------------------------------------------------


def _plain(path: Path, values: np.ndarray) -> Path:
    a = zarr.create_array(str(path), shape=values.shape, dtype=values.dtype,
                          chunks=(4, *values.shape[1:]))
    a[:] = values
    return path


def test_evaluate_preview_and_training_read_plain_zarr_arrays(phantoms, tmp_path, capsys):
    train_vol, val_vol = phantoms
    ds = xr.open_zarr(train_vol)
    labels = _plain(tmp_path / "labels.zarr", ds["labels"].values)
    image = _plain(tmp_path / "image.zarr", ds["image"].values)
    code, out, err = run(capsys, "evaluate", labels, labels)
    assert code == 0, err
    assert "mIoU" in out and "1.000" in out
    code, _, err = run(capsys, "evaluate", labels, train_vol)  # a plain array vs a store
    assert code == 0, err
    code, _, err = run(capsys, "preview", image, "--labels", labels, "-o", tmp_path / "p.png")
    assert code == 0, err
    # HDF5 with one dataset and NPY need no name either
    import h5py

    with h5py.File(tmp_path / "truth.h5", "w") as f:
        f.create_dataset("exchange/data", data=ds["labels"].values)
    np.save(tmp_path / "pred.npy", ds["labels"].values)
    code, out, err = run(capsys, "evaluate", tmp_path / "pred.npy", tmp_path / "truth.h5")
    assert code == 0 and "1.000" in out, err
    # segment-volume reads a plain array too
    from segment_utils import make_checkpoint

    ckpt = make_checkpoint(tmp_path / "ckpt.pt")
    code, _, err = run(capsys, "segment-volume", image, tmp_path / "seg.zarr", "--model", ckpt,
                       "--in-process", "--workers", 1, "--threads-per-worker", 1,
                       "--dashboard-address", "127.0.0.1:0")
    assert code == 0, err
    assert xr.open_zarr(tmp_path / "seg.zarr")["labels"].shape == SHAPE

    cfg = config_from_dict(tiny(image, label_volume=str(labels), val_volume=str(val_vol)))
    summary = run_training(cfg, tmp_path / "run")
    assert summary["iterations"] == 2
    assert read_split(tmp_path / "run/splits/labeled.txt") == ["0", "8", "15"]  # dense: even
    # labels inside the image store must be named: a plain image array has none
    with pytest.raises(MagsegError, match="data.label_var or data.label_volume"):
        run_training(config_from_dict(tiny(image)), tmp_path / "run2")


# --- bad inputs: one line, exit 2, nothing written -------------------------------------------


@pytest.fixture
def painted(phantoms, tmp_path) -> tuple[Path, Path]:
    train_vol, _ = phantoms
    truth = xr.open_zarr(train_vol)["labels"].values
    masks = tmp_path / "masks"
    masks.mkdir()
    paint(truth[3], masks / "z00003.png")
    return train_vol, masks


def _one_line_error(code, err, match):
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("magseg-hpc: error:"), err
    assert match in lines[0], lines[0]


@pytest.mark.parametrize("case", ["out_of_range", "duplicate", "wrong_size", "no_colors",
                                  "other_axis"])
def test_bad_sparse_masks(painted, tmp_path, capsys, case):
    train_vol, masks = painted
    extra = []
    if case == "out_of_range":
        Image.open(masks / "z00003.png").save(masks / "z00016.png")
        match = "slice 16 is out of range 0..15"
    elif case == "duplicate":
        Image.open(masks / "z00003.png").save(masks / "z3_copy.png")
        match = "are both masks of z slice 3"
    elif case == "wrong_size":
        (masks / "z00003.png").unlink()
        Image.new("RGB", (20, 32)).save(masks / "z00003.png")
        match = "mask is 32x20 but z slices"
    elif case == "no_colors":
        match = "need --colors"
    else:
        extra = ["--axis", "y"]
        match = "names another axis"
    colors = [] if case == "no_colors" else ["--colors", tmp_path / "c.json"]
    (tmp_path / "c.json").write_text(json.dumps(TABLE.to_dict()))
    out = tmp_path / "labels.zarr"
    code, _, err = run(capsys, "import-masks", masks, out, *colors, "--like", train_vol, *extra)
    _one_line_error(code, err, match)
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".labels.zarr")]


@pytest.mark.parametrize("args,match", [
    (["--n", "17"], "--n 17: choose 1 to 16 slices"),
    (["--slices", "3,99"], "slice 99 along z is out of range"),
    (["--suggestions", "missing.txt"], "cannot read the slice list"),
    (["--n", "2", "--var", "nope"], "no variable 'nope'"),
])
def test_bad_exports(phantoms, tmp_path, capsys, args, match):
    out = tmp_path / "shots"
    code, _, err = run(capsys, "export-slices", phantoms[0], out,
                       *[str(tmp_path / a) if a.endswith(".txt") else a for a in args])
    _one_line_error(code, err, match)
    assert not out.exists()


def test_export_refuses_an_existing_folder(phantoms, tmp_path, capsys):
    out = tmp_path / "shots"
    out.mkdir()
    (out / "mine.png").write_bytes(b"keep")
    code, _, err = run(capsys, "export-slices", phantoms[0], out, "--n", 2, "--overwrite")
    _one_line_error(code, err, "not written by magseg-hpc")  # a user's folder: never replaced
    assert (out / "mine.png").read_bytes() == b"keep"
    ours = tmp_path / "ours"
    assert run(capsys, "export-slices", phantoms[0], ours, "--n", 2)[0] == 0
    code, _, err = run(capsys, "export-slices", phantoms[0], ours, "--n", 3)
    _one_line_error(code, err, "already exists; pass --overwrite")
    assert run(capsys, "export-slices", phantoms[0], ours, "--n", 3, "--overwrite")[0] == 0
    assert len(list(ours.glob("z*.png"))) == 3


def test_suggest_refuses_bad_inputs_before_any_work(phantoms, tmp_path, capsys):
    out = tmp_path / "next.txt"
    code, _, err = run(capsys, "suggest-slices", phantoms[0], "--model", tmp_path / "none.pt",
                       "--n", 2, "-o", out, "--in-process", "--dashboard-address",
                       "127.0.0.1:0")
    assert code == 2 and "none.pt" in err
    assert not out.exists() and not list(tmp_path.iterdir())


def test_slice_scores_inside_the_sample(tmp_path):
    import dask.array as da

    from magseg_hpc.segment.suggest import slice_scores
    from magseg_hpc.volume.store import create_label_store, write_label_region

    shape = (3, 10, 10)
    like = xr.DataArray(da.zeros(shape, chunks=shape), dims=("z", "y", "x"))
    store = tmp_path / "p.zarr"
    create_label_store(store, like=like, class_table=TABLE, provenance={},
                       with_probabilities=True)
    labels = np.zeros(shape, np.uint8)
    probs = np.zeros((3, *shape), np.float32)
    probs[0] = 1.0  # background, certain, everywhere ...
    labels[:2, :5] = 1  # ... except half of slices 0 and 1: domain_minus
    probs[:, 0, :5] = np.array([0.0, 0.9, 0.1])[:, None, None]  # slice 0: fairly sure
    probs[:, 1, :5] = np.array([0.1, 0.5, 0.4])[:, None, None]  # slice 1: unsure
    write_label_region(store, (slice(None),) * 3, labels, probs)
    ent, whole = slice_scores(store, "z", "entropy")
    assert np.isnan(ent[2]) and ent[1] > ent[0] > 0  # slice 2: no sample, no candidate
    assert whole[1] == pytest.approx(ent[1] / 2, rel=0.02)  # half the slice is sure background
    margin, _ = slice_scores(store, "z", "margin")
    assert margin[0] == pytest.approx(1 - (230 - 26) / 255, abs=0.01)  # quantised 0.9, 0.1
    assert margin[1] > margin[0]
    assert slice_scores(store, "y", "entropy")[0].shape == (10,)


def test_export_overwrite_replaces_only_an_export_folder(phantoms, tmp_path, capsys):
    """export-slices --overwrite never puts a PNG folder in the place of an image store."""
    train_vol, _ = phantoms
    store = tmp_path / "copy.zarr"
    code, _, err = run(capsys, "ingest", train_vol, store)
    assert code == 0, err
    before = sorted(str(p.relative_to(store)) for p in store.rglob("*"))
    code, _, err = run(capsys, "export-slices", train_vol, store, "--n", 2, "--overwrite")
    assert code == 2 and "image store, and this command writes slices" in err
    assert sorted(str(p.relative_to(store)) for p in store.rglob("*")) == before
    shots = tmp_path / "shots"
    assert run(capsys, "export-slices", train_vol, shots, "--n", 2)[0] == 0
    assert run(capsys, "export-slices", train_vol, shots, "--n", 3, "--overwrite")[0] == 0
    assert len(list(shots.glob("z*.png"))) == 3
