"""`magseg-hpc evaluate` on small real zarr stores."""

from __future__ import annotations

import json

import numpy as np
import pytest
import xarray as xr

from magseg_hpc.classes import ClassTable
from magseg_hpc.cli import main
from magseg_hpc.metrics import confusion_matrix, scores_from_confusion
from magseg_hpc.volume.store import (
    create_label_store,
    set_complete,
    write_image_store,
    write_label_region,
)

SHAPE = (9, 20, 22)


def _truth_and_pred(seed: int = 0):
    rng = np.random.default_rng(seed)
    truth = np.zeros(SHAPE, dtype=np.uint8)
    truth[:, 4:16, 4:18] = 1
    truth[:, 8:12, 6:16] = 2
    truth[2, :3, :3] = 255  # a few unlabelled voxels
    pred = truth.copy()
    pred[pred == 255] = 0
    flip = rng.random(SHAPE) < 0.1
    pred[flip] = rng.integers(0, 3, int(flip.sum()))
    pred[7] = 0  # one bad slice
    return truth, pred


def _pred_store(path, pred, table=None, chunks=(4, 16, 16)):
    like = xr.DataArray(np.zeros(pred.shape, np.float32), dims=("z", "y", "x"))
    create_label_store(
        path,
        like=like,
        class_table=table or ClassTable.default(),
        provenance={"test": True},
        chunks=chunks,
    )
    write_label_region(path, (slice(None),) * 3, pred)
    set_complete(path)


@pytest.fixture
def stores(tmp_path):
    truth, pred = _truth_and_pred()
    image = truth.astype(np.float32) + np.random.default_rng(1).normal(0, 0.2, SHAPE)
    truth_path = tmp_path / "truth.zarr"
    # different chunking from the prediction, uneven against the shape
    write_image_store(
        truth_path,
        image.astype(np.float32),
        labels=truth,
        class_table=ClassTable.default(),
        chunks=(5, 7, 9),
    )
    pred_path = tmp_path / "pred.zarr"
    _pred_store(pred_path, pred)
    return truth_path, pred_path, truth, pred


def test_evaluate_report_table_and_figures(stores, tmp_path, capsys):
    truth_path, pred_path, truth, pred = stores
    report = tmp_path / "out" / "report.json"
    figures = tmp_path / "figs"
    rc = main(
        [
            "evaluate",
            str(pred_path),
            str(truth_path),
            "--report",
            str(report),
            "--figures",
            str(figures),
            "--slices",
            "1,7",
        ]
    )
    assert rc == 0
    out = capsys.readouterr().out
    want = scores_from_confusion(confusion_matrix(pred, truth, 3))
    assert f"{want['miou']:.4f}" in out
    assert "domain_minus" in out and "confusion matrix" in out

    r = json.loads(report.read_text())
    assert r["format"] == "magseg-hpc/evaluation/1"
    assert r["shape"] == list(SHAPE)
    assert r["miou"] == pytest.approx(want["miou"])
    assert r["pixel_accuracy"] == pytest.approx(want["pixel_accuracy"])
    assert [c["iou"] for c in r["classes"]] == pytest.approx(want["iou"])
    assert [c["dice"] for c in r["classes"]] == pytest.approx(want["dice"])
    assert [c["name"] for c in r["classes"]] == list(ClassTable.default().names)
    cm = np.asarray(r["confusion_matrix"]["values"])
    np.testing.assert_array_equal(cm[:, :3], confusion_matrix(pred, truth, 3))
    assert r["labelled_voxels"] == int((truth != 255).sum())
    assert r["invalid_predictions"] == 0
    per_slice = r["per_slice_miou"]
    assert len(per_slice) == SHAPE[0]
    assert per_slice[7] == pytest.approx(
        scores_from_confusion(confusion_matrix(pred[7], truth[7], 3))["miou"]
    )
    assert per_slice[7] < min(v for i, v in enumerate(per_slice) if i != 7)

    names = sorted(p.name for p in figures.iterdir())
    assert names == ["per_slice_miou.png", "slice_z00001.png", "slice_z00007.png"]
    from PIL import Image

    with Image.open(figures / "slice_z00007.png") as im:
        assert im.size[0] > 3 * im.size[1]  # image, truth, prediction, error side by side


def test_empty_class_reported_null_and_out_of_range_counted(tmp_path, capsys):
    truth = np.zeros((3, 8, 8), np.uint8)
    truth[:, 2:6, 2:6] = 1  # class 2 absent from truth...
    pred = truth.copy()
    pred[0, 0, 0] = 255  # ...and from the prediction; one voxel predicted out of range
    write_image_store(tmp_path / "t.zarr", truth.astype(np.float32), labels=truth)
    _pred_store(tmp_path / "p.zarr", pred, chunks=(2, 8, 8))
    rc = main(
        [
            "evaluate",
            str(tmp_path / "p.zarr"),
            str(tmp_path / "t.zarr"),
            "--report",
            str(tmp_path / "r.json"),
        ]
    )
    assert rc == 0
    out = capsys.readouterr().out
    assert "absent" in out and "1 voxels predicted outside the class table" in out
    r = json.loads((tmp_path / "r.json").read_text())
    assert r["classes"][2]["iou"] is None and r["classes"][2]["present"] is False
    assert r["invalid_predictions"] == 1
    # background: I = 3*48 - 1, U = 3*48 -> mIoU over the two present classes only
    assert r["miou"] == pytest.approx(((143 / 144) + 1.0) / 2)


def test_shape_mismatch_refused_with_one_line(stores, tmp_path, capsys):
    truth_path, _, truth, pred = stores
    other = tmp_path / "small.zarr"
    _pred_store(other, pred[:, :, :-1])
    rc = main(["evaluate", str(other), str(truth_path)])
    assert rc == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0
    assert err.startswith("magseg-hpc: error:") and "9x20x21" in err and "9x20x22" in err


def test_class_table_mismatch_refused_with_one_line(stores, tmp_path, capsys):
    truth_path, _, truth, pred = stores
    other = tmp_path / "other.zarr"
    table = ClassTable(names=("air", "up", "down"), colors=((0, 0, 0), (1, 1, 1), (2, 2, 2)))
    _pred_store(other, pred, table=table)
    rc = main(["evaluate", str(other), str(truth_path)])
    assert rc == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "class tables differ" in err and "'air'" in err


def test_bad_slices_and_ignore_refused(stores, capsys):
    truth_path, pred_path, _, _ = stores
    assert main(["evaluate", str(pred_path), str(truth_path), "--ignore", "1"]) == 2
    assert "is a class label" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["evaluate", str(pred_path), str(truth_path), "--slices", "a,b"])


def test_incomplete_store_refused_unless_allowed(stores, tmp_path, capsys):
    truth_path, pred_path = stores[0], stores[1]
    set_complete(pred_path, False)
    assert main(["evaluate", str(pred_path), str(truth_path)]) == 2
    assert "marked incomplete" in capsys.readouterr().err
    assert main(["evaluate", str(pred_path), str(truth_path), "--allow-incomplete"]) == 0


def test_default_figures_show_labelled_slices_of_a_sparse_truth(tmp_path):
    """A truth painted on 3 of 40 slices: the figures show those, not grey unlabelled ones."""
    truth = np.full((40, 8, 8), 255, np.uint8)
    for z in (5, 20, 33):
        truth[z] = 1
        truth[z, :4] = 0
    pred = np.where(truth == 255, 0, truth).astype(np.uint8)
    pred[33, 0, 0] = 2  # the worst slice
    write_image_store(tmp_path / "t.zarr", np.zeros(truth.shape, np.float32), labels=truth)
    _pred_store(tmp_path / "p.zarr", pred, chunks=(8, 8, 8))
    figures = tmp_path / "figs"
    assert main(["evaluate", str(tmp_path / "p.zarr"), str(tmp_path / "t.zarr"),
                 "--figures", str(figures)]) == 0
    shown = sorted(p.name for p in figures.glob("slice_*.png"))
    assert shown == ["slice_z00005.png", "slice_z00020.png", "slice_z00033.png"]
