"""Synthetic phantoms: reproducible, balanced, correct ground truth, requested SNR."""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr
from scipy import ndimage

from magseg_hpc.data.phantom import make_phantom, preset_params, write_phantom
from magseg_hpc.errors import MagsegError

ODD = (17, 45, 38)


def test_same_seed_is_bit_identical():
    a = make_phantom(ODD, seed=5)
    b = make_phantom(ODD, seed=5)
    assert a.image.dtype == np.float32 and a.labels.dtype == np.uint8
    assert a.image.shape == ODD and a.labels.shape == ODD
    assert a.image.tobytes() == b.image.tobytes()
    assert np.array_equal(a.labels, b.labels)
    assert a.params == b.params


def test_different_seeds_differ():
    a = make_phantom(ODD, seed=1)
    b = make_phantom(ODD, seed=2)
    assert not np.array_equal(a.labels, b.labels)
    assert np.abs(a.image - b.image).mean() > 0.05


@pytest.mark.parametrize(
    "kwargs",
    [
        {"support": "pillar", "pattern": "labyrinth", "seed": 0},
        {"support": "cylinder", "pattern": "stripes", "seed": 3, "swirl": 1.5},
        {"support": "slab", "pattern": "labyrinth", "seed": 11, "tilt_deg": 15.0},
    ],
)
def test_odd_shapes_balanced_classes_and_labels_only_inside(kwargs):
    p = make_phantom(ODD, snr=None, **kwargs)
    assert set(np.unique(p.labels)) == {0, 1, 2}
    inside = p.labels > 0
    plus = (p.labels == 2).sum() / inside.sum()
    assert 0.25 <= plus <= 0.75
    # The support does not cover the volume's corners; the noise-free image is dark there.
    corners = [p.labels[:, 0, 0], p.labels[:, -1, -1]]
    assert all((c == 0).all() for c in corners)
    assert p.image[inside].mean() > 3 * abs(p.image[~inside].mean())
    # Bright voxels are plus domains: the image carries the labels' information.
    assert p.image[p.labels == 2].mean() > p.image[p.labels == 1].mean() + 0.2


def test_pillar_support_is_a_vertical_disk():
    p = make_phantom((6, 40, 40), snr=None, tilt_deg=0.0, seed=4)
    inside = p.labels > 0
    assert (inside == inside[0]).all()  # same cross-section in every z slice
    yy, xx = np.mgrid[:40, :40] - 19.5
    radius = np.sqrt(yy**2 + xx**2)
    assert inside[0][radius < 14].all() and not inside[0][radius > 16].any()


def test_net_magnetization_shifts_the_balance():
    p = make_phantom(ODD, snr=None, net_magnetization=0.4, seed=2)
    inside = p.labels > 0
    assert (p.labels == 2).sum() / inside.sum() == pytest.approx(0.7, abs=0.01)


@pytest.mark.parametrize("snr", [1.0, 2.0, 5.0])
def test_snr_as_requested(snr):
    clean = make_phantom(ODD, snr=None, seed=9)
    noisy = make_phantom(ODD, snr=snr, seed=9)
    # Changing snr changes only the noise: same truth, and the difference is the noise.
    assert np.array_equal(clean.labels, noisy.labels)
    noise = noisy.image.astype(np.float64) - clean.image
    contrast = clean.image[clean.labels == 2].mean() - clean.image[clean.labels == 1].mean()
    assert contrast / noise.std() == pytest.approx(snr, rel=0.02)
    assert noisy.params["snr"] == snr and noisy.params["noise_std"] > 0


def test_artifacts_and_blur_can_be_switched_off():
    p = make_phantom(ODD, snr=None, n_angles=0, blur_sigma=0.0, edge_glow=0.0, shading=0.0,
                     seed=1)
    # Without image formation effects the outside is exactly zero.
    assert (p.image[p.labels == 0] == 0).all()
    q = make_phantom(ODD, snr=None, seed=1)
    assert np.abs(q.image[p.labels == 0]).max() > 0  # streaks reach outside the sample


def test_shading_is_low_frequency_and_seeded():
    kw = {"snr": None, "n_angles": 0, "blur_sigma": 0.0, "edge_glow": 0.0, "seed": 6}
    flat = make_phantom((12, 48, 48), shading=0.0, tilt_deg=0.0, **kw)
    shaded = make_phantom((12, 48, 48), shading=0.5, tilt_deg=0.0, **kw)
    assert np.array_equal(flat.labels, shaded.labels)  # shading never touches the truth
    assert shaded.params["shading"] == 0.5 and flat.params["shading"] == 0.0
    again = make_phantom((12, 48, 48), shading=0.5, tilt_deg=0.0, **kw)
    assert shaded.image.tobytes() == again.image.tobytes()
    # Per-slice offsets: the (unshaded: exactly zero) outside now differs between slices.
    outside = [float(shaded.image[z][flat.labels[z] == 0].mean()) for z in range(12)]
    assert np.std(outside) > 0.02
    # Cupping: plus domains near the axis are darker than plus domains near the rim.
    yy, xx = np.mgrid[:48, :48] - 23.5
    r = np.broadcast_to(np.sqrt(yy**2 + xx**2), flat.labels.shape)
    plus = flat.labels == 2
    ratio = shaded.image / np.where(flat.image == 0, 1, flat.image)
    centre, rim = ratio[plus & (r < 6)].mean(), ratio[plus & (r > 14)].mean()
    assert rim - centre > 0.15
    # Default phantoms (shading on) keep the old image when shading is switched off.
    old = make_phantom(ODD, seed=2, shading=0.0)
    assert old.params["shading"] == 0.0
    assert not np.array_equal(old.image, make_phantom(ODD, seed=2).image)


@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"support": "sphere"}, "pillar, cylinder, slab"),
        ({"pattern": "dots"}, "labyrinth, stripes"),
        ({"shape": (2, 30, 30)}, ">= 4"),
        ({"anisotropy": 0.5}, "anisotropy"),
        ({"snr": -1.0}, "snr"),
        ({"missing_wedge_deg": 179.0}, "missing_wedge_deg"),
        ({"shading": 1.5}, "shading"),
        ({"encoding": "log"}, "intensity, uint8-masked, signed, signed-nan, unmasked"),
    ],
)
def test_bad_parameters_are_one_line_errors(kwargs, words):
    kwargs = {"shape": ODD, **kwargs}
    with pytest.raises(MagsegError, match=words) as e:
        make_phantom(kwargs.pop("shape"), **kwargs)
    assert "\n" not in str(e.value)


def test_write_phantom_round_trip(tmp_path):
    p = make_phantom(ODD, seed=3)
    path = tmp_path / "ph.zarr"
    write_phantom(path, p)
    ds = xr.open_zarr(path)
    np.testing.assert_array_equal(ds["image"].values, p.image)
    np.testing.assert_array_equal(ds["labels"].values, p.labels)
    assert ds["image"].dims == ("z", "y", "x")
    assert ds.attrs["phantom"]["seed"] == 3
    assert ds.attrs["class_table"]["names"] == ["background", "domain_minus", "domain_plus"]
    with pytest.raises(MagsegError, match="already exists"):
        write_phantom(path, make_phantom(ODD, seed=4))
    assert xr.open_zarr(path).attrs["phantom"]["seed"] == 3  # not clobbered


def test_cli_make_phantom(tmp_path, cli):
    out = tmp_path / "ph.zarr"
    r = cli("make-phantom", out, "--shape", "9,33,31", "--seed", "7", "--snr", "1.5",
            "--pattern", "stripes")
    assert r.returncode == 0, r.stderr
    ds = xr.open_zarr(out)
    assert ds["image"].shape == (9, 33, 31) and ds["image"].dtype == np.float32
    assert ds.attrs["phantom"]["pattern"] == "stripes"
    assert ds.attrs["phantom"]["snr"] == 1.5
    expected = make_phantom((9, 33, 31), seed=7, snr=1.5, pattern="stripes")
    np.testing.assert_array_equal(ds["image"].values, expected.image)

    before = sorted(p.name for p in out.rglob("*"))
    r = cli("make-phantom", out, "--shape", "9,33,31")
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        f"magseg-hpc: error: {out} already exists; pass --overwrite to replace it"
    ]
    assert sorted(p.name for p in out.rglob("*")) == before


def test_cli_make_phantom_bad_option(tmp_path):
    from magseg_hpc.cli import main

    out = tmp_path / "ph.zarr"
    assert main(["make-phantom", str(out), "--shape", "3,30,30"]) == 2
    assert not out.exists()


# --- encodings: one sample, as each kind of reconstruction stores it -------------------------

SMALL = (8, 48, 48)


def encoded(encoding, **kw):
    return make_phantom(SMALL, seed=3, encoding=encoding, **kw)


def kept(labels, margin=2):
    """The support dilated by the default margin of the masked encodings."""
    return ndimage.binary_dilation(labels > 0, iterations=margin)


def test_signed_encodings_are_one_sample_masked_at_the_middle():
    signed, nan, unmasked = (encoded(e) for e in ("signed", "signed-nan", "unmasked"))
    keep = kept(signed.labels)
    assert signed.image.dtype == nan.image.dtype == unmasked.image.dtype == np.float32
    assert signed.params["encoding"] == "signed" and nan.params["encoding"] == "signed-nan"
    np.testing.assert_array_equal(nan.image[keep], signed.image[keep])
    # unmasked: the same sample, the midpoint taken off as the reconstruction sees the support
    inner = ndimage.binary_erosion(signed.labels > 0, iterations=3)
    assert np.corrcoef(unmasked.image[inner], signed.image[inner])[0, 1] > 0.99
    # NaN exactly where signed is its masked 0.0: outside the dilated support, nowhere inside.
    np.testing.assert_array_equal(np.isnan(nan.image), ~keep)
    np.testing.assert_array_equal(signed.image == 0.0, ~keep)
    # The outside is zero magnetisation: between the classes, not below the dark one.
    minus, plus = (float(signed.image[signed.labels == c].mean()) for c in (1, 2))
    assert minus < 0.0 < plus
    outside = unmasked.image[~keep]
    assert outside.std() > 0.05 and abs(outside.mean()) < 0.1 * (plus - minus)


@pytest.mark.parametrize("preset", ["default", "tomo"])  # an image, a tilt series' FBP
def test_unmasked_signed_puts_zero_magnetisation_at_zero_in_every_slice(preset):
    """The classes sit symmetrically about 0 with the masked encoding's contrast, slice by
    slice, whatever the reconstruction's gain (FBP, drift, shading) did to the seen support;
    the outside far from the sample is about 0."""
    params = {**preset_params(preset, seed=3, snr=None), "shape": (8, 48, 48)}
    unmasked, signed = (make_phantom(**{**params, "encoding": e}) for e in ("unmasked", "signed"))
    image, labels = unmasked.image, unmasked.labels
    for z in range(len(image)):
        minus, plus = (float(image[z][labels[z] == c].mean()) for c in (1, 2))
        contrast = np.diff([signed.image[z][labels[z] == c].mean() for c in (1, 2)])[0]
        assert abs(minus + plus) < 0.02 * contrast, (z, minus, plus)
        assert abs((plus - minus) - contrast) < 0.1 * contrast, (z, minus, plus, contrast)
    far = ~ndimage.binary_dilation(labels > 0, iterations=6)
    assert abs(float(image[far].mean())) < 0.1


def test_signed_encodings_honour_mask_margin_and_decide_the_dtype():
    zero = encoded("signed", mask_margin=0)
    np.testing.assert_array_equal(zero.image == 0.0, zero.labels == 0)
    for encoding in ("signed", "signed-nan", "unmasked"):  # a preset's bit_depth 8 is moot
        assert encoded(encoding, bit_depth=8).image.dtype == np.float32


@pytest.mark.parametrize("blur_sigma", [0.0, 1.0])
def test_uint8_masked_is_the_signed_sample_quantised(blur_sigma):
    signed = encoded("signed", blur_sigma=blur_sigma)
    grey = encoded("uint8-masked", blur_sigma=blur_sigma)
    assert grey.image.dtype == np.uint8 and grey.params["encoding"] == "uint8-masked"
    assert (grey.image[~kept(grey.labels)] == 0).all()
    # Affine over the whole kept region, the margin around the sample included
    inner = kept(grey.labels)
    unclipped = inner & (grey.image > 0) & (grey.image < 255)
    assert unclipped.sum() > 0.5 * inner.sum()
    r = np.corrcoef(grey.image[unclipped], signed.image[unclipped])[0, 1]
    assert r > 0.99


@pytest.mark.parametrize("preset", ["default", "sweep"])
def test_intensity_encoding_is_the_phantom_as_before(preset):
    params = preset_params(preset, shape=SMALL)
    shape = params.pop("shape")
    before = make_phantom(shape, **params)
    assert before.params["encoding"] == "intensity"
    after = make_phantom(shape, **{**params, "encoding": "intensity"})
    assert after.image.dtype == before.image.dtype
    assert after.image.tobytes() == before.image.tobytes() and after.params == before.params


def test_cli_make_phantom_signed_nan(tmp_path, cli):
    out = tmp_path / "ph.zarr"
    r = cli("make-phantom", out, "--shape", "8,48,48", "--seed", "3", "--encoding",
            "signed-nan")
    assert r.returncode == 0, r.stderr
    ds = xr.open_zarr(out)
    assert ds["image"].dtype == np.float32 and ds.attrs["phantom"]["encoding"] == "signed-nan"
    image = ds["image"].values
    np.testing.assert_array_equal(np.isnan(image), ~kept(ds["labels"].values))
    np.testing.assert_array_equal(image, encoded("signed-nan").image)


# --- the tomo preset: the acquisition simulated ------------------------------------------------


def tomo(**kw):
    from magseg_hpc.data.phantom import preset_params

    params = preset_params("tomo", **kw)
    params.pop("shape")
    return make_phantom((6, 48, 48), **params)


def test_tomo_noise_is_the_photon_noise_at_the_requested_snr():
    clean, noisy = tomo(snr=float("inf")), tomo(snr=1.0)
    assert noisy.params["acquisition"] == "projections" and noisy.image.tobytes() == (
        tomo(snr=1.0).image.tobytes())
    assert np.array_equal(clean.labels, noisy.labels)
    noise = noisy.image.astype(np.float64) - clean.image
    contrast = noisy.params["contrast"]
    assert contrast > 0 and contrast / noise.std() == pytest.approx(1.0, rel=0.02)
    # reconstructed projection noise: streaky and correlated within a slice, not white
    lag1 = np.corrcoef(noise[:, :, :-1].ravel(), noise[:, :, 1:].ravel())[0, 1]
    assert abs(lag1) > 0.1


def test_tomo_rings_stay_at_one_radius_through_z_and_the_mask_is_exact():
    without = tomo(snr=float("inf"), detector_offsets=0.0, z_drift=0.0)
    rings = tomo(snr=float("inf"), z_drift=0.0).image.astype(np.float64) - without.image
    # the same detector pixels in every row: the ring pattern of slice 0 is that of slice 5
    assert np.corrcoef(rings[0].ravel(), rings[5].ravel())[0, 1] > 0.8
    assert rings[without.labels > 0].std() == pytest.approx(0.3 * without.params["contrast"],
                                                            rel=0.05)
    masked = tomo(mask_margin=0)
    assert (masked.image[masked.labels == 0] == 0).all()
    assert (masked.image[masked.labels > 0] != 0).all()


def test_tomo_needs_a_tilt_series():
    with pytest.raises(MagsegError, match="n_angles >= 2"):
        tomo(n_angles=0)
