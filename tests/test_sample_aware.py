"""What makes models work on data like published reconstructions: the 8-bit masked `sweep`
phantom, normalisation fitted on the sample, the masked-background support, foreground crops,
2.5D context slices (training and segment-volume) and multi-axis training."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from distributed import Client, LocalCluster
from segment_utils import MODEL_CFG, default_precision, make_volume, read_labels, write_input

from magseg_hpc.data.augment import strong_augment, weak_augment
from magseg_hpc.data.normalize import (
    apply_normalization,
    fit_normalization,
)
from magseg_hpc.data.phantom import make_phantom, preset_params, write_phantom
from magseg_hpc.data.slices import MultiAxisSlices, VolumeSlices
from magseg_hpc.data.splits import other_axis_keys
from magseg_hpc.errors import MagsegError
from magseg_hpc.metrics import confusion_matrix, scores_from_confusion
from magseg_hpc.segment.pipeline import SegmentOptions, segment_volume
from magseg_hpc.segment.threshold import threshold_segment_volume
from magseg_hpc.volume.support import detect_support, plane_support

ZERO = {"outside": "value", "value": 0.0}  # an outside masked at exactly 0


def _miou(pred, truth):
    return scores_from_confusion(confusion_matrix(pred, truth, 3))["miou"]


@pytest.fixture(scope="module")
def sweep():
    params = preset_params("sweep", shape=(12, 96, 96), seed=2)
    return make_phantom(params.pop("shape"), **params)


# --- the sweep preset -------------------------------------------------------------------------

def test_sweep_preset_looks_like_a_published_8bit_reconstruction(sweep):
    image, labels = sweep.image, sweep.labels
    assert image.dtype == np.uint8
    sample = labels > 0
    assert 0.08 < sample.mean() < 0.2  # a small sample in a large field of view
    outside = ~np.stack([np.pad(s, 3)[3:-3, 3:-3] for s in sample])
    far = outside & (np.stack([np.roll(s, 4, 0) | np.roll(s, -4, 0) | np.roll(s, 4, 1)
                               | np.roll(s, -4, 1) for s in sample]) == 0)
    assert (image[far] == 0).all()  # masked: exactly 0 away from the sample
    dark, bright = image[labels == 1].mean(), image[labels == 2].mean()
    assert dark < 30 < 80 < bright  # the dark domains sit just above the background
    assert (image[labels == 1] == 0).mean() > 0.1  # ... often exactly on it


def test_presets_are_overridable_and_unknown_ones_refused():
    params = preset_params("sweep", snr=1.5, bit_depth=0)
    assert params["snr"] == 1.5 and params["bit_depth"] == 0 and params["ellipticity"] > 1
    assert preset_params("default")["bit_depth"] == 0
    with pytest.raises(MagsegError, match="preset"):
        preset_params("nope")


def test_cli_preset_writes_uint8(tmp_path, cli):
    out = tmp_path / "s.zarr"
    r = cli("make-phantom", out, "--preset", "sweep", "--shape", "8,64,64", "--rings", "0")
    assert r.returncode == 0, r.stderr
    import zarr

    g = zarr.open_group(str(out), mode="r")
    assert g["image"].dtype == np.uint8 and g.attrs["phantom"]["rings"] == 0.0


# --- normalisation and support ----------------------------------------------------------------

def test_normalisation_ignores_a_masked_background(sweep):
    norm = fit_normalization(sweep.image)
    assert norm["support"]["value"] == 0.0
    inside = sweep.image[sweep.image != 0].astype(np.float64)
    assert norm["low"] == pytest.approx(np.percentile(inside, 0.5))
    assert norm["high"] == pytest.approx(np.percentile(inside, 99.5))
    # a float field of view with no masked floor keeps every voxel
    assert fit_normalization(make_volume((4, 16, 16)))["support"]["outside"] == "none"
    assert detect_support(np.zeros((1, 4, 4)))["outside"] == "none"  # constant: no mask


def test_scale_invariant_input_statistics(sweep):
    """The same volume at another intensity scale gives the same model input."""
    image = sweep.image.astype(np.float32)
    a = apply_normalization(image, fit_normalization(image))
    b = apply_normalization(image * 7.5 + 0.0, fit_normalization(image * 7.5))
    np.testing.assert_allclose(a, b, atol=1e-4)


def test_statistics_of_a_large_numpy_volume_are_sampled_like_a_dask_one(sweep):
    import dask.array as da

    image = np.tile(sweep.image, (2, 1, 1))  # more voxels than max_samples: a strided sample
    small = image.size // 5
    as_numpy = fit_normalization(image, max_samples=small)
    assert as_numpy == fit_normalization(da.from_array(image, chunks=5), max_samples=small)
    assert as_numpy["support"]["value"] == 0.0


def test_masked_support_keeps_dark_domains_inside(sweep):
    support = np.stack([plane_support(s, ZERO) for s in sweep.image])
    truth = sweep.labels > 0
    assert (support & truth).sum() / truth.sum() > 0.98  # zero-valued dark pixels stay inside
    # the rest is the masked reconstruction's 2 px margin around the sample (the model's call)
    from scipy import ndimage

    margin = np.stack([ndimage.binary_dilation(t, iterations=3) for t in truth])
    assert (support & ~margin).sum() == 0


def test_threshold_baseline_uses_the_mask_on_masked_volumes(sweep):
    import xarray as xr

    labels = threshold_segment_volume(xr.DataArray(sweep.image, dims=("z", "y", "x")))
    truth = sweep.labels
    iou_dark = scores_from_confusion(confusion_matrix(labels, truth, 3))["iou"][1]
    assert iou_dark > 0.6  # the plain intensity support called most dark domains background
    assert _miou(labels, truth) > 0.75


# --- augmentation -----------------------------------------------------------------------------

def test_foreground_crops_hold_the_sample():
    image = np.zeros((200, 200), np.float32)
    mask = np.zeros((200, 200), np.uint8)
    mask[150:160, 20:30] = 1  # a small sample in a corner
    image[mask > 0] = 1.0
    hits = {0.0: 0, 1.0: 0}
    for prob in hits:
        for seed in range(40):
            _, m = weak_augment(image, mask, crop_size=32, scale_range=(1.0, 1.0),
                                generator=np.random.default_rng(seed), focus=mask > 0,
                                focus_prob=prob)
            hits[prob] += int((m == 1).any())
    assert hits[1.0] == 40 and hits[0.0] < 10


def test_context_stacks_share_geometry_and_intensity_ops():
    rng = np.random.default_rng(0)
    stack = rng.random((5, 40, 40)).astype(np.float32)
    stack[2] = stack[0]  # centre equals the first neighbour
    mask = (stack[2] > 0.5).astype(np.uint8)
    img, msk = weak_augment(stack, mask, crop_size=24, generator=np.random.default_rng(1),
                            scale_range=(0.8, 1.2), vflip=True, rot90=True)
    assert img.shape == (5, 24, 24) and msk.shape == (24, 24)
    torch.testing.assert_close(img[2], img[0])  # one geometry for every channel
    strong = strong_augment(img, np.random.default_rng(3), num_ops=3, random_num_ops=False,
                            pool=["contrast", "blur", "gamma"])
    assert strong.shape == img.shape
    torch.testing.assert_close(strong[2], strong[0])  # the same operations on every channel


# --- multi-axis slices ------------------------------------------------------------------------

def test_other_axis_slices_carry_the_labelled_lines(tmp_path):
    phantom = make_phantom((10, 24, 20), seed=1, n_angles=0)
    path = tmp_path / "p.zarr"
    write_phantom(path, phantom)
    primary = VolumeSlices(path, "z")
    labeled_z = [2, 7]
    labeled, unlabeled = other_axis_keys(primary, ["z", "y", "x"], len(labeled_z))
    assert len(labeled) == 4 and len(unlabeled) == 24 + 20
    multi = MultiAxisSlices(primary, ["z", "y", "x"], labeled_z)
    y = multi.read_labels("y:5")
    assert y.shape == (10, 20)
    np.testing.assert_array_equal(y[labeled_z], phantom.labels[labeled_z, 5, :])
    assert (np.delete(y, labeled_z, axis=0) == 255).all()
    x = multi.read_labels("x:3")
    np.testing.assert_array_equal(x[labeled_z], phantom.labels[labeled_z, :, 3])
    assert multi.read_image("x:3", 3).shape == (3, 10, 24)
    np.testing.assert_array_equal(multi.read_labels("7"), phantom.labels[7])


# --- 2.5D through segment-volume --------------------------------------------------------------

def _context_checkpoint(path, context):
    from magseg_hpc.classes import ClassTable
    from magseg_hpc.models import build_model
    from magseg_hpc.models.checkpoint import save_checkpoint

    torch.manual_seed(0)
    cfg = {**MODEL_CFG, "context_slices": context}
    model = build_model(cfg)
    state = model.state_dict()
    gen = torch.Generator().manual_seed(0)
    for k, v in state.items():
        if k.endswith("running_mean"):
            state[k] = torch.randn(v.shape, generator=gen) * 0.1
    save_checkpoint(path, {
        "model": cfg, "class_table": ClassTable.default().to_dict(),
        "normalization": {"low": -2.0, "high": 2.0, "mean": 0.5, "std": 0.25},
        "student": state, "teacher": state,
    })
    return path


def _context_reference(ckpt, volume, norm, context, axis="z"):
    from magseg_hpc.models.checkpoint import load_inference_model

    model, _ = load_inference_model(ckpt)
    ax = "zyx".index(axis)
    vol = np.moveaxis(volume, ax, 0)
    n, half = vol.shape[0], context // 2
    out = np.empty(vol.shape, np.uint8)
    with torch.no_grad(), default_precision():  # segment-volume's default
        for i in range(n):
            idx = np.clip(np.arange(i - half, i + half + 1), 0, n - 1)
            x = torch.from_numpy(apply_normalization(vol[idx], norm))[None]
            out[i] = model(x).argmax(1)[0].numpy()
    return np.moveaxis(out, 0, ax)


@pytest.fixture(scope="module")
def client():
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=False,
                      dashboard_address=":0") as cluster, Client(cluster) as c:
        yield c


@pytest.mark.parametrize("axis, chunks, slab", [("z", (4, 16, 16), 3), ("y", (13, 7, 29), 5)])
def test_context_model_slabs_match_whole_volume_reference(tmp_path, client, axis, chunks, slab):
    volume = make_volume((13, 37, 29))
    ckpt = _context_checkpoint(tmp_path / "c5.pt", 5)
    inp = write_input(tmp_path / "in.zarr", volume, chunks)
    out = tmp_path / "out.zarr"
    segment_volume(SegmentOptions(str(inp), str(out), model=str(ckpt), slab_size=slab,
                                  batch_size=3, axes=(axis,)), client, progress=False)
    expected = _context_reference(ckpt, volume, fit_normalization(volume), 5, axis)
    assert len(np.unique(expected)) > 1
    np.testing.assert_array_equal(read_labels(out), expected)


@pytest.mark.parametrize("axes", [("z",), ("z", "y", "x")])
def test_masked_background_is_background_whatever_the_model_says(tmp_path, client, sweep, axes):
    ckpt = _context_checkpoint(tmp_path / "c1.pt", 1)
    inp = write_input(tmp_path / "in.zarr", sweep.image, (4, 96, 96))
    out = tmp_path / "out.zarr"
    segment_volume(SegmentOptions(str(inp), str(out), model=str(ckpt), slab_size=4, axes=axes),
                   client, progress=False)
    labels = read_labels(out)
    support = np.stack([plane_support(s, ZERO) for s in sweep.image])
    assert (labels[~support] == 0).all()
    assert (labels[support] != 0).any()  # inside, the model decides
    if len(axes) > 1:
        # The z-plane support rules the fused volume: on y planes the tilted pillar leaves
        # through the top and bottom, so dark masked-valued pixels there are not holes and a
        # per-plane support would force them to background.
        y_support = np.stack([plane_support(s, ZERO) for s in sweep.image.transpose(1, 0, 2)],
                             axis=1)
        cut_by_y = support & ~y_support
        assert cut_by_y.sum() > 20
        assert (labels[cut_by_y] != 0).any()


def test_model_skips_planes_of_masked_background_only():
    from magseg_hpc.segment.kernel import segment_slab

    params = preset_params("sweep", shape=(8, 160, 160), seed=3)
    image = make_phantom(params.pop("shape"), **params).image
    norm = fit_normalization(image)
    assert norm["support"]["value"] == 0.0
    torch.manual_seed(0)
    model = torch.nn.Conv2d(3, 3, 1).eval()
    seen = []
    model.register_forward_hook(lambda m, args, out: seen.append(tuple(args[0].shape)))
    for axis in (0, 1):  # z planes all cut the pillar; many y planes beside it hold none of it
        planes = np.moveaxis(image, axis, 0)
        seen.clear()
        labels, probs = segment_slab(model, planes, norm, num_classes=3, batch_size=4,
                                     with_probabilities=True, context=3)
        ctx = np.stack([planes[np.clip(np.arange(i - 1, i + 2), 0, len(planes) - 1)]
                        for i in range(len(planes))])
        with torch.no_grad():
            expected = model(torch.from_numpy(apply_normalization(ctx, norm))).argmax(1).numpy()
        outside = ~np.stack([plane_support(p, ZERO) for p in planes])
        expected[outside] = 0
        np.testing.assert_array_equal(labels, expected)
        assert (probs[0][outside] == 255).all()
        ran = sum(shape[0] for shape in seen[:-1])  # the last call is the reference
        empty = int((ctx == 0).reshape(len(ctx), -1).all(axis=1).sum())
        assert ran == len(planes) - empty
        assert empty == 0 if axis == 0 else empty > len(planes) // 3
        assert all(shape[-2:] == planes.shape[1:] for shape in seen)  # whole planes


# --- schedule and planes ----------------------------------------------------------------------

def test_fixed_length_epochs_cover_any_volume_size():
    from magseg_hpc.data.sampling import epoch_plan

    long = epoch_plan(0, n_labeled=3, n_unlabeled=5, batch_size=2, seed=0, iters=10)
    assert long.iters == 10 and len(long.unlabeled) == 10  # more steps than one pass
    short = epoch_plan(0, n_labeled=3, n_unlabeled=500, batch_size=2, seed=0, iters=4)
    assert short.iters == 4 and len({i for b in short.unlabeled for _, _, i in b}) == 8


def test_axes_auto_follows_the_trained_planes(caplog):
    from magseg_hpc.segment.pipeline import _warn_untrained_axes, trained_axes

    multi = {"config": {"data": {"volume": "v.zarr", "axis": "z", "axes": ["x", "z", "y"]}}}
    assert trained_axes(multi) == ("z", "y", "x")
    old = {"config": {"data": {"volume": "v.zarr", "axis": "z"}}}
    assert trained_axes(old) == ("z",) and trained_axes({}) == ("z",)
    with caplog.at_level("WARNING"):
        _warn_untrained_axes(old, ("z", "y", "x"))
    assert "trained on z slices only" in caplog.text


def test_axes_auto_fuses_only_planes_with_enough_labelled_rows(caplog):
    from magseg_hpc.segment.pipeline import FUSION_MIN_SHARE, axes_for_auto

    data = {"volume": "v.zarr", "axis": "z", "axes": ["z", "y", "x"]}
    assert axes_for_auto({"config": {"data": data}}) == ("z", "y", "x")  # older checkpoints
    assert axes_for_auto({"config": {"data": data}, "labelled_share": 8 / 64}) == ("z", "y", "x")
    with caplog.at_level("INFO"):
        assert axes_for_auto({"config": {"data": data}, "labelled_share": 8 / 213}) == ("z",)
    assert "--axes auto: z only" in caplog.text and "3.8 %" in caplog.text
    assert 8 / 213 < FUSION_MIN_SHARE <= 8 / 64
    one = {"config": {"data": {"volume": "v.zarr", "axis": "z"}}, "labelled_share": 0.01}
    assert axes_for_auto(one) == ("z",)


def test_demo_iterations_make_a_whole_schedule():
    from conftest import REPO

    from magseg_hpc.commands.demo import _schedule

    assert _schedule(str(REPO / "configs/cpu_best.yaml"), None) == []
    assert _schedule(str(REPO / "configs/cpu_best.yaml"), 250) == ["train.epochs=3",
                                                                    "train.max_iters=250"]
    with pytest.raises(MagsegError):
        _schedule(str(REPO / "configs/cpu_best.yaml"), 0)


@pytest.fixture(scope="module")
def multi_axis_run(tmp_path_factory):
    """A short 2.5D training on z, y and x slices: (training volume, summary)."""
    from magseg_hpc.config import config_from_dict
    from magseg_hpc.train import run_training

    tmp_path = tmp_path_factory.mktemp("multi_axis")
    path = tmp_path / "p.zarr"
    write_phantom(path, make_phantom((12, 32, 32), seed=0, n_angles=0))
    cfg = config_from_dict({
        "model": {"backbone": "resnet10", "width": 16, "context_slices": 3,
                  "decoder_channels": 16},
        "data": {"volume": str(path), "n_labeled": 3, "n_val": 2, "axes": ["z", "y", "x"]},
        "train": {"batch_size": 2, "crop_size": 16, "epochs": 2, "iters_per_epoch": 2,
                  "sup_only_epochs": 0, "optimizer": "adamw", "foreground_crop": 0.5,
                  "checkpoint_every": 4, "eval_every": 4, "log_every": 1, "device": "cpu",
                  "threads": 1},
    })
    return path, run_training(cfg, tmp_path / "run")


def test_training_with_context_axes_and_foreground_crops(multi_axis_run):
    from magseg_hpc.data.splits import read_split
    from magseg_hpc.models.checkpoint import load_checkpoint

    _, summary = multi_axis_run
    run = Path(summary["output_dir"])
    assert summary["iterations"] == 4 and summary["iterations_per_epoch"] == 2
    labeled = read_split(run / "splits/labeled.txt")
    assert sum(":" not in k for k in labeled) == 3  # the labelled z slices
    assert {k.split(":")[0] for k in labeled if ":" in k} == {"y", "x"}
    assert len(read_split(run / "splits/unlabeled.txt")) == 7 + 32 + 32
    ckpt = load_checkpoint(run / "best.pt")
    assert ckpt["model"]["context_slices"] == 3 and ckpt["model"]["decoder_channels"] == 16
    assert ckpt["normalization"]["support"]["outside"] == "none"
    assert ckpt["labelled_share"] == 3 / 12  # 3 labelled of 12 z slices (val included)
    # the log counts labelled slices per plane, the summary carries the fusion check
    assert "9 labelled (3 z + 3 y + 3 x slices)" in (run / "logs/rank0.log").read_text()
    assert summary["fusion_check"]["axes"] == ["z", "y", "x"]
    assert summary["fusion_check"]["axis_miou"] == ckpt["fusion_check"]["axis_miou"]


def test_fusion_check_scores_validation_slices_as_segment_volume_does(multi_axis_run, client,
                                                                       tmp_path):
    """best.pt's fusion check (training's end) gives the mIoUs that segment-volume's outputs
    along z alone and fused over z, y, x score on the validation slices."""
    from magseg_hpc.data.splits import read_split
    from magseg_hpc.models.checkpoint import load_checkpoint
    from magseg_hpc.segment.pipeline import axes_for_auto

    volume, summary = multi_axis_run
    best = Path(summary["output_dir"]) / "best.pt"
    ckpt = load_checkpoint(best)
    check = ckpt["fusion_check"]
    val = [int(k) for k in read_split(Path(summary["output_dir"]) / "splits/val.txt")]
    assert check["slices"] == val and check["axes"] == ["z", "y", "x"]
    assert check["iteration"] == ckpt["metrics"]["best"]["iteration"]
    truth = zarr.open_group(str(volume), mode="r")["labels"][:][val]
    for axes, key in ((("z",), "axis_miou"), (("z", "y", "x"), "fused_miou")):
        out = tmp_path / f"{''.join(axes)}.zarr"
        segment_volume(SegmentOptions(str(volume), str(out), model=str(best), slab_size=4,
                                      axes=axes), client, progress=False)
        # (batches of other sizes may move a rounded probability: one voxel is ~1e-4)
        assert _miou(read_labels(out)[val], truth) == pytest.approx(check[key], abs=1e-3)
    assert axes_for_auto(ckpt) == (("z", "y", "x") if check["fused_miou"] > check["axis_miou"]
                                   else ("z",))


def test_axes_auto_follows_the_fusion_check(caplog):
    from magseg_hpc.segment.pipeline import axes_for_auto

    data = {"volume": "v.zarr", "axis": "z", "axes": ["z", "y", "x"]}

    def ckpt(axis_miou, fused_miou):  # a share that alone would keep z only
        return {"config": {"data": data}, "labelled_share": 2 / 213, "fusion_check": {
            "axis": "z", "axes": ["z", "y", "x"], "slices": [1, 2], "axis_miou": axis_miou,
            "fused_miou": fused_miou}}

    with caplog.at_level("INFO"):
        assert axes_for_auto(ckpt(0.80, 0.85)) == ("z", "y", "x")
    assert "z alone scored mIoU 0.8000, fused z,y,x 0.8500" in caplog.text
    assert axes_for_auto(ckpt(0.85, 0.80)) == ("z",)
    assert axes_for_auto(ckpt(0.85, 0.85)) == ("z",)  # a tie: a third of the work
