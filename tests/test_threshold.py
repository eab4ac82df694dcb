"""The classical threshold baseline on a phantom: beats chance, slabs agree, bad input refused."""

from __future__ import annotations

import json

import dask.array as da
import numpy as np
import pytest
import xarray as xr

from magseg_hpc.data.phantom import make_phantom
from magseg_hpc.errors import MagsegError
from magseg_hpc.metrics import confusion_matrix, scores_from_confusion
from magseg_hpc.segment.threshold import (
    apply_threshold,
    fit_threshold_params,
    threshold_halo,
    threshold_segment,
    threshold_segment_volume,
)


@pytest.fixture(scope="module")
def phantom():
    return make_phantom((24, 64, 64), snr=2.0, seed=3)


def _miou(pred, truth):
    return scores_from_confusion(confusion_matrix(pred, truth, 3))["miou"]


def test_baseline_beats_chance_and_majority(phantom):
    labels = threshold_segment_volume(
        xr.DataArray(da.from_array(phantom.image, chunks=(8, 64, 64)), dims=("z", "y", "x")),
        slab_depth=8,
    )
    assert labels.dtype == np.uint8 and labels.shape == phantom.labels.shape
    assert set(np.unique(labels)) <= {0, 1, 2}
    rng = np.random.default_rng(0)
    chance = _miou(rng.integers(0, 3, phantom.labels.shape), phantom.labels)
    majority_class = np.bincount(phantom.labels.ravel()).argmax()
    majority = _miou(np.full_like(phantom.labels, majority_class), phantom.labels)
    got = _miou(labels, phantom.labels)
    assert chance < 0.35 and majority < 0.35
    assert got > 0.6, f"baseline mIoU {got:.3f}"
    # both domain classes found, not just the support
    iou = scores_from_confusion(confusion_matrix(labels, phantom.labels, 3))["iou"]
    assert min(iou) > 0.45, iou


def test_slabs_with_halo_match_the_whole_volume(phantom):
    params = fit_threshold_params(phantom.image)
    whole = apply_threshold(phantom.image, params)
    slabbed = threshold_segment_volume(phantom.image, params=params, slab_depth=5)
    np.testing.assert_array_equal(slabbed, whole)
    assert threshold_halo(params) >= 2 * params["support_sigma_z"]


def test_an_unmasked_support_is_averaged_along_the_sample_through_strong_noise():
    """Unmasked and signed at SNR 1 the outside's noise is as large as a domain's signal: the
    long average along z (the sample extends there) finds the support better than the plane
    alone, and the slab halo still covers it."""
    plane_only, along_z = [], []
    for seed in (0, 1, 2):
        p = make_phantom((24, 64, 64), seed=seed, snr=1.0, encoding="unmasked")
        plane_only.append(_miou(threshold_segment_volume(p.image, {"support_sigma_z": 0}),
                                p.labels))
        along_z.append(_miou(threshold_segment_volume(p.image, slab_depth=5), p.labels))
    assert np.mean(along_z) > np.mean(plane_only) + 0.01, (along_z, plane_only)


def test_params_are_global_and_json_serialisable(phantom):
    params = fit_threshold_params(phantom.image)
    assert json.loads(json.dumps(params)) == params
    # params survive a JSON round trip (they travel in provenance and to Dask workers)
    slab = phantom.image[:4]
    np.testing.assert_array_equal(
        apply_threshold(slab, params), apply_threshold(slab, json.loads(json.dumps(params)))
    )
    assert 0 < params["support_threshold"] < phantom.image.max()


def test_threshold_segment_single_slab_and_magnitude_feature(phantom):
    labels = threshold_segment(phantom.image)
    assert _miou(labels, phantom.labels) > 0.6
    # a signed image (minus domains negative, background 0): magnitude finds the support
    signed = np.where(phantom.labels == 1, -1.0, np.where(phantom.labels == 2, 1.0, 0.0))
    signed = signed + np.random.default_rng(1).normal(0, 0.3, signed.shape)
    labels = threshold_segment(signed, {"support_feature": "magnitude"})
    assert _miou(labels, phantom.labels) > 0.7


def test_bad_input_refused():
    with pytest.raises(MagsegError, match="constant"):
        threshold_segment(np.ones((4, 16, 16)))
    with pytest.raises(MagsegError, match=r"\(z, y, x\)"):
        threshold_segment(np.ones((16, 16)))
    with pytest.raises(MagsegError, match="unknown threshold option 'sigma'.*support_sigma"):
        fit_threshold_params(np.random.default_rng(0).random((4, 16, 16)), {"sigma": 2})
    with pytest.raises(MagsegError, match="fit_threshold_params"):
        apply_threshold(np.zeros((2, 8, 8)), {"support_threshold": 0.5})
