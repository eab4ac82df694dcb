"""Metrics against hand-computed cases, and the chunked/torch paths against the numpy oracle."""

from __future__ import annotations

import math

import dask.array as da
import numpy as np
import pytest
import torch
import xarray as xr

from magseg_hpc.errors import MagsegError
from magseg_hpc.metrics import (
    confusion_matrix,
    per_slice_confusion,
    per_slice_miou,
    scores_from_confusion,
    volume_confusion,
)

# truth        pred
# 0 0 1        0 1 1
# 1 2 255      1 0 2     (255 = ignore: that pixel is left out whatever the prediction)
TRUTH = np.array([[0, 0, 1], [1, 2, 255]], dtype=np.uint8)
PRED = np.array([[0, 1, 1], [1, 0, 2]], dtype=np.uint8)
# pairs (truth, pred): (0,0) (0,1) (1,1) (1,1) (2,0)
#            pred 0 1 2
HAND_CM = np.array(
    [
        [1, 1, 0],  # truth 0
        [0, 2, 0],  # truth 1
        [1, 0, 0],  # truth 2
    ]
)


def test_confusion_matrix_by_hand():
    cm = confusion_matrix(PRED, TRUTH, 3)
    assert cm.dtype == np.int64
    np.testing.assert_array_equal(cm, HAND_CM)


def test_scores_by_hand():
    s = scores_from_confusion(HAND_CM)
    # class 0: I = 1, U = |truth 0| + |pred 0| - I = 2 + 2 - 1 = 3 -> 1/3, Dice 2*1/(2+2) = 0.5
    # class 1: I = 2, U = 2 + 3 - 2 = 3 -> 2/3, Dice 4/5 = 0.8
    # class 2: I = 0, U = 1 + 0 - 0 = 1 -> 0, Dice 0 (present in truth, missed)
    np.testing.assert_allclose(s["iou"], [1 / 3, 2 / 3, 0.0])
    np.testing.assert_allclose(s["dice"], [0.5, 0.8, 0.0])
    assert s["present"] == [True, True, True]
    assert s["miou"] == pytest.approx((1 / 3 + 2 / 3 + 0) / 3)
    assert s["mean_dice"] == pytest.approx((0.5 + 0.8 + 0) / 3)
    # 3 correct of 5 labelled pixels; the ignore pixel is not counted
    assert s["pixel_accuracy"] == pytest.approx(3 / 5)
    assert s["labelled"] == 5
    assert s["support"] == [2, 2, 1]


def test_ignore_pixels_are_left_out_whatever_the_prediction():
    # every pixel is ignore except one correct one: a perfect score, 1 labelled voxel
    truth = np.array([[255, 255, 1], [255, 255, 255]], dtype=np.uint8)
    pred = np.array([[0, 2, 1], [2, 0, 1]], dtype=np.uint8)
    cm = confusion_matrix(pred, truth, 3)
    assert cm.sum() == 1 and cm[1, 1] == 1
    s = scores_from_confusion(cm)
    assert s["pixel_accuracy"] == 1.0
    assert s["miou"] == 1.0  # classes 0 and 2 are absent: excluded, not scored 0


def test_custom_ignore_and_no_ignore():
    truth = np.array([[0, 9], [1, 1]])
    pred = np.array([[0, 0], [1, 0]])
    cm = confusion_matrix(pred, truth, 2, ignore=9)
    np.testing.assert_array_equal(cm, [[1, 0], [1, 1]])
    with pytest.raises(MagsegError, match="truth has 1 voxels with labels outside"):
        confusion_matrix(pred, truth, 2, ignore=None)


def test_empty_class_is_nan_and_excluded_from_miou():
    # truth 0 0 1 / 1 1 0, pred identical except one: class 2 never appears anywhere
    truth = np.array([[0, 0, 1], [1, 1, 0]])
    pred = np.array([[0, 0, 1], [1, 0, 0]])
    s = scores_from_confusion(confusion_matrix(pred, truth, 3))
    # class 0: I = 3, U = 3 + 4 - 3 = 4 -> 0.75 ; class 1: I = 2, U = 3 + 2 - 2 = 3 -> 2/3
    assert s["iou"][0] == pytest.approx(0.75)
    assert s["iou"][1] == pytest.approx(2 / 3)
    assert math.isnan(s["iou"][2]) and math.isnan(s["dice"][2])
    assert s["present"] == [True, True, False]
    assert s["miou"] == pytest.approx((0.75 + 2 / 3) / 2)  # not /3 as I/(U+1e-10) would give


def test_class_only_in_prediction_scores_zero():
    truth = np.array([[0, 0], [0, 0]])
    pred = np.array([[0, 0], [0, 2]])
    s = scores_from_confusion(confusion_matrix(pred, truth, 3))
    # class 0: I = 3, U = 4 -> 0.75; class 2: I = 0, U = 1 -> 0 (a false positive counts)
    assert s["iou"][0] == pytest.approx(0.75)
    assert s["iou"][2] == 0.0 and s["present"] == [True, False, True]
    assert s["miou"] == pytest.approx(0.375)


def test_all_ignored_gives_nan_scores():
    truth = np.full((2, 3), 255)
    s = scores_from_confusion(confusion_matrix(np.zeros((2, 3), int), truth, 3))
    assert s["labelled"] == 0
    assert math.isnan(s["miou"]) and math.isnan(s["pixel_accuracy"])


def test_out_of_range_prediction_refused_by_default_and_counted_on_request():
    truth = np.array([[0, 1, 1], [2, 2, 255]])
    pred = np.array([[0, 255, 1], [2, 7, 255]])  # 255 over the ignore pixel does not count
    with pytest.raises(MagsegError, match="prediction has 2 voxels"):
        confusion_matrix(pred, truth, 3)
    cm = confusion_matrix(pred, truth, 3, invalid_column=True)
    assert cm.shape == (3, 4)
    np.testing.assert_array_equal(cm[:, 3], [0, 1, 1])
    s = scores_from_confusion(cm)
    # class 1: I = 1, U = 2 (truth) + 1 (pred) - 1 = 2 -> 0.5; class 2 likewise 0.5
    np.testing.assert_allclose(s["iou"], [1.0, 0.5, 0.5])
    assert s["pixel_accuracy"] == pytest.approx(3 / 5)
    assert s["invalid_predictions"] == 2


def test_shape_mismatch_refused():
    with pytest.raises(MagsegError, match="shape"):
        confusion_matrix(np.zeros((2, 3), int), np.zeros((3, 2), int), 3)


def test_torch_equals_numpy():
    rng = np.random.default_rng(1)
    truth = rng.integers(0, 4, (3, 17, 19)).astype(np.uint8)
    truth[truth == 3] = 255
    pred = rng.integers(0, 3, (3, 17, 19)).astype(np.int64)
    want = confusion_matrix(pred, truth, 3)
    got = confusion_matrix(torch.from_numpy(pred), torch.from_numpy(truth), 3)
    assert isinstance(got, torch.Tensor) and got.dtype == torch.int64
    np.testing.assert_array_equal(got.numpy(), want)
    assert scores_from_confusion(got) == scores_from_confusion(want)
    got_inv = confusion_matrix(
        torch.from_numpy(pred), torch.from_numpy(truth), 3, invalid_column=True
    )
    np.testing.assert_array_equal(got_inv.numpy()[:, :3], want)
    assert int(got_inv[:, 3].sum()) == 0


def test_torch_out_of_range_prediction_refused():
    with pytest.raises(MagsegError, match="prediction has 1 voxels"):
        confusion_matrix(torch.tensor([0, 5]), torch.tensor([0, 1]), 3)


@pytest.fixture
def odd_volume():
    rng = np.random.default_rng(2)
    truth = rng.integers(0, 4, (7, 11, 13)).astype(np.uint8)
    truth[truth == 3] = 255
    pred = rng.integers(0, 3, (7, 11, 13)).astype(np.uint8)
    pred[0, 0, :4] = 255  # out-of-range predictions, to exercise the invalid column
    return pred, truth


def test_dask_chunked_equals_in_memory(odd_volume):
    pred, truth = odd_volume
    want = confusion_matrix(pred, truth, 3, invalid_column=True)
    # uneven chunks that differ between pred and truth
    p = da.from_array(pred, chunks=((3, 4), (5, 6), (4, 4, 5)))
    t = da.from_array(truth, chunks=((2, 5), (11,), (6, 7)))
    got = volume_confusion(p, t, 3, invalid_column=True)
    np.testing.assert_array_equal(got, want)
    # xarray in, numpy in
    xp = xr.DataArray(p, dims=("z", "y", "x"))
    xt = xr.DataArray(t, dims=("z", "y", "x"))
    np.testing.assert_array_equal(volume_confusion(xp, xt, 3, invalid_column=True), want)
    np.testing.assert_array_equal(volume_confusion(pred, truth, 3, invalid_column=True), want)
    with pytest.raises(MagsegError, match="prediction has"):
        volume_confusion(p, t, 3)


def test_per_slice_confusion_and_miou(odd_volume):
    pred, truth = odd_volume
    p = da.from_array(pred, chunks=((3, 4), (5, 6), (4, 4, 5)))
    slices = per_slice_confusion(p, truth, 3, invalid_column=True)
    assert slices.shape == (7, 3, 4)
    for z in range(7):
        np.testing.assert_array_equal(
            slices[z], confusion_matrix(pred[z], truth[z], 3, invalid_column=True)
        )
    np.testing.assert_array_equal(
        slices.sum(axis=0), volume_confusion(p, truth, 3, invalid_column=True)
    )
    miou = per_slice_miou(p, truth, 3, invalid_column=True)
    want = [
        scores_from_confusion(confusion_matrix(pred[z], truth[z], 3, invalid_column=True))["miou"]
        for z in range(7)
    ]
    np.testing.assert_allclose(miou, want)


def test_per_slice_miou_by_hand():
    # slice 0 perfect; slice 1 all wrong (truth 1, pred 0 -> both classes IoU 0); slice 2 ignored
    truth = np.array([[[0, 1]], [[1, 1]], [[255, 255]]])
    pred = np.array([[[0, 1]], [[0, 0]], [[1, 0]]])
    miou = per_slice_miou(da.from_array(pred, chunks=(2, 1, 1)), truth, 2)
    assert miou[0] == 1.0 and miou[1] == 0.0 and math.isnan(miou[2])
