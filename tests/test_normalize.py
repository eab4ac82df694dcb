"""Percentile normalisation on numpy and dask inputs."""

import dask.array as da
import numpy as np
import pytest
import torch

from magseg_hpc.data.normalize import (
    apply_normalization,
    fit_normalization,
    scale_to_unit,
    standardize,
)
from magseg_hpc.errors import MagsegError


def test_fit_formula_exact_on_small_arrays():
    rng = np.random.default_rng(0)
    v = rng.gamma(2.0, 30.0, size=(8, 32, 32)).astype(np.float32)
    norm = fit_normalization(v)
    low, high = np.percentile(v.astype(np.float64), [0.5, 99.5])
    assert norm["low"] == pytest.approx(low) and norm["high"] == pytest.approx(high)
    x01 = np.clip((v - low) / (high - low), 0, 1)
    assert norm["mean"] == pytest.approx(x01.mean(), rel=1e-5)
    assert norm["std"] == pytest.approx(x01.std(), rel=1e-5)
    out = apply_normalization(v, norm)
    assert out.dtype == np.float32
    assert out.mean() == pytest.approx(0, abs=1e-4) and out.std() == pytest.approx(1, rel=1e-3)
    assert norm["support"]["outside"] == "none"  # no masked background in this volume
    assert all(isinstance(norm[k], float) for k in ("low", "high", "mean", "std"))
    assert norm["deciles"] == pytest.approx(np.percentile(x01, range(10, 100, 10)), abs=1e-4)


def test_dask_strided_sample_close_to_exact():
    rng = np.random.default_rng(1)
    v = rng.normal(100, 10, size=(20, 64, 64)).astype(np.float32)
    exact = fit_normalization(v)
    sampled = fit_normalization(da.from_array(v, chunks=(5, 32, 32)), max_samples=10_000)
    for k in ("low", "high", "mean", "std"):
        assert sampled[k] == pytest.approx(exact[k], rel=0.05)
    same = fit_normalization(da.from_array(v, chunks=(5, 32, 32)))
    assert same.pop("support") == exact.pop("support")
    assert same.pop("deciles") == pytest.approx(exact.pop("deciles"), abs=1e-4)
    assert same == pytest.approx(exact)


def test_torch_and_numpy_agree_and_steps_compose():
    norm = {"low": 10.0, "high": 20.0, "mean": 0.5, "std": 0.25}
    x = np.array([0.0, 10.0, 15.0, 30.0], np.float32)
    np.testing.assert_allclose(scale_to_unit(x, norm), [0, 0, 0.5, 1])
    np.testing.assert_allclose(apply_normalization(x, norm), [-2, -2, 0, 2])
    t = standardize(scale_to_unit(torch.from_numpy(x), norm), norm)
    np.testing.assert_allclose(t.numpy(), [-2, -2, 0, 2])


def test_constant_or_empty_volume_refused():
    with pytest.raises(MagsegError, match="constant"):
        fit_normalization(np.full((4, 4), 3.0))
    with pytest.raises(MagsegError, match="finite"):
        fit_normalization(np.full((4, 4), np.nan))


def test_extreme_finite_values():
    """+-1e308 voxels: a few are outliers clipped like any other; percentiles float32 cannot
    subtract are refused in one line, never NaN statistics and an all-background output."""
    rng = np.random.default_rng(0)
    volume = rng.normal(size=(8, 32, 32))
    volume[0, 0, :3] = [1e308, -1e308, 5.0]
    norm = fit_normalization(volume)
    assert all(np.isfinite(norm[k]) for k in ("low", "high", "mean", "std"))
    x = apply_normalization(volume, norm)
    assert np.isfinite(x).all() and x[0, 0, 0] == x.max() and x[0, 0, 1] == x.min()
    # spread values (one value over a quarter of the volume would be a clip level, left out)
    volume[:, :4] = rng.uniform(1e307, 1e308, size=(8, 4, 32))
    volume[:, 4:8] = -rng.uniform(1e307, 1e308, size=(8, 4, 32))
    with pytest.raises(MagsegError, match="beyond float32 arithmetic"):
        fit_normalization(volume)


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.uint8])
def test_fit_leaves_the_input_unchanged(dtype):
    """The sample is filtered, partitioned and scaled in place: on a copy, never the caller's
    array (a numpy input small enough to be its own sample is the case that could alias)."""
    rng = np.random.default_rng(2)
    v = (rng.random((6, 16, 16)) * 200).astype(dtype)
    v[0, 0, 0] = 0
    before = v.copy()
    norm = fit_normalization(v)
    np.testing.assert_array_equal(v, before)
    assert norm["low"] < norm["high"]
    lazy = fit_normalization(da.from_array(v, chunks=(2, 8, 8)))
    assert lazy.pop("support") == norm.pop("support")
    assert lazy.pop("deciles") == pytest.approx(norm.pop("deciles"), abs=1e-4)
    assert lazy == pytest.approx(norm)
    np.testing.assert_array_equal(v, before)


def test_a_clip_level_is_left_out_but_a_few_grey_levels_are_data():
    """An end value holding a third of the sample (the 8-bit export's clipped dark domains)
    is left out of the statistics; four evenly used grey levels all stay."""
    rng = np.random.default_rng(1)
    values = rng.normal(0.0, 1.0, 30000).astype(np.float32)
    clipped = np.maximum(values, np.float32(-0.4))  # a third at one value
    norm = fit_normalization(clipped, support={"outside": "none"})
    inner = fit_normalization(values[values > -0.4], support={"outside": "none"})
    assert norm["low"] == inner["low"] and norm["deciles"] == inner["deciles"]
    levels = np.repeat(np.arange(4, dtype=np.uint8), 1000)
    norm = fit_normalization(levels, support={"outside": "none"})
    assert (norm["low"], norm["high"]) == (0.0, 3.0)
