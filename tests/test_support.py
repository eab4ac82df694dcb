"""One support decision per volume, whatever the encoding (magseg_hpc.volume.support).

The same phantom sample as 8-bit masked at 0, signed float with the outside at 0.0 (the
middle of the range), NaN outside, scaled and offset (outside at 5.0), unmasked, and with a
separate mask file: the decision each gets, the model input each gives, the baseline on
each, and the commands' lines for a wrong mask or override.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import TINY_MODEL

from magseg_hpc.cli import main
from magseg_hpc.data.normalize import apply_normalization, fit_normalization
from magseg_hpc.data.phantom import make_phantom
from magseg_hpc.metrics import confusion_matrix, scores_from_confusion
from magseg_hpc.segment.threshold import threshold_segment_volume
from magseg_hpc.volume.io import open_volume
from magseg_hpc.volume.store import open_group
from magseg_hpc.volume.support import detect_support, outside_planes, plane_support

# dark and bright far enough from 0 and 255 that the 8-bit copy is not clipped
SAMPLE = {"shape": (8, 64, 64), "seed": 3, "snr": 8.0, "dark_level": 100.0,
          "bright_level": 150.0}


@pytest.fixture(scope="module")
def encodings() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{encoding: (image, truth labels)}: one sample, six encodings."""
    out = {e: make_phantom(**SAMPLE, encoding=e)
           for e in ("uint8-masked", "signed", "signed-nan", "unmasked")}
    found = {e: (p.image, p.labels) for e, p in out.items()}
    signed, labels = found["signed"]
    found["scaled"] = ((3.0 * signed + 5.0).astype(np.float32), labels)  # outside at 5.0
    return found


def miou(pred: np.ndarray, truth: np.ndarray) -> float:
    return scores_from_confusion(confusion_matrix(pred, truth, 3))["miou"]


@pytest.mark.parametrize("encoding, expected", [
    ("uint8-masked", {"outside": "value", "value": 0.0}),
    ("signed", {"outside": "value", "value": 0.0}),
    ("signed-nan", {"outside": "nan"}),
    ("scaled", {"outside": "value", "value": 5.0}),
    ("unmasked", {"outside": "none"}),
])
def test_each_encoding_gets_its_outside(encodings, encoding, expected):
    found = detect_support(encodings[encoding][0])
    assert {k: v for k, v in found.items() if k != "source"} == expected


def test_a_common_grey_level_that_does_not_line_the_border_is_not_an_outside():
    """Low-contrast 8-bit data: one grey level holds ~40 % of the voxels, but it is data."""
    rng = np.random.default_rng(0)
    image = np.clip(np.rint(rng.normal(100, 0.6, (4, 32, 32))), 0, 255).astype(np.uint8)
    assert np.mean(image == 100) > 0.4
    image[:, :, :2] = 7  # a border column of another value: still not most of the border
    assert detect_support(image)["outside"] == "none"


def test_the_same_sample_gives_the_same_model_input(encodings):
    """8-bit masked, signed (0.0 outside), NaN outside and scaled/offset: one model input."""
    def model_input(image):
        return apply_normalization(image, {**fit_normalization(image), "mark_outside": True})

    signed = encodings["signed"][0]
    reference = model_input(signed)
    outside = reference == reference.min()
    assert 0.3 < outside.mean() < 0.9  # the outside is marked, the sample is not
    # the sample's voxels: outside pixels inside a plane's hull are the outside encoding's
    # own value (0.0, 5.0, NaN: mid grey), which differs between encodings by design
    sample = signed != 0
    for encoding in ("signed-nan", "scaled", "uint8-masked"):
        x = model_input(encodings[encoding][0])
        np.testing.assert_array_equal(x == x.min(), outside)
        difference = np.abs(x - reference)[sample]
        if encoding == "uint8-masked":  # 8-bit quantisation only
            assert difference.mean() < 0.03 and difference.max() < 0.1, encoding
        else:
            assert difference.max() < 1e-4, encoding


def test_an_8bit_export_that_clipped_dark_domains_into_the_outside_gives_its_float_input(
        encodings):
    """The published sweep's case: its 8-bit export put the darkest third of the sample at
    the masked 0; the float copy has those voxels at one value inside the sample (here -1.2),
    its outside at 0.0. The clip level is left out of both fits: one model input wherever the
    8-bit copy still tells the sample from the outside (inside its planes' hulls: a clipped
    voxel on the sample's edge is the outside to it, as it is to anyone reading it)."""
    image8 = encodings["uint8-masked"][0].copy()
    outside = image8 == 0
    dark = ~outside & (image8 < np.percentile(image8[~outside], 30))
    image8[dark] = 0
    signed = np.where(outside, 0.0, (image8.astype(np.float32) - 64) / 55).astype(np.float32)
    assert 0.25 < np.mean(signed[~outside] == signed.min()) < 0.35

    def model_input(image):
        norm = fit_normalization(image)
        return apply_normalization(image, {**norm, "mark_outside": True}), norm

    x8, norm8 = model_input(image8)
    xs, norms = model_input(signed)
    assert norm8["deciles"] == norms["deciles"]
    seen = ~outside & (x8 > x8.min())
    assert seen.sum() > 0.9 * (~outside).sum()
    np.testing.assert_allclose(xs[seen], x8[seen], atol=1e-4)


def test_nan_inside_the_hull_is_mid_grey_not_nan(encodings):
    image = encodings["signed-nan"][0].copy()
    inside = plane_support(image[4], {"outside": "nan"})
    hole = tuple(np.argwhere(inside)[len(np.argwhere(inside)) // 2])
    image[(4, *hole)] = np.nan
    x = apply_normalization(image, {**fit_normalization(image), "mark_outside": True})
    assert np.isfinite(x).all()


def test_the_baseline_is_fair_on_every_encoding(encodings):
    """Within 0.01 of the 8-bit masked encoding on the masked ones; on the unmasked one the
    three-level split finds the sample through the noise where the others have a mask (within
    0.02 here; benchmarks/results/encodings_phantoms.md on the presets)."""
    scores = {e: miou(threshold_segment_volume(image), truth)
              for e, (image, truth) in encodings.items()}
    for encoding in ("signed", "signed-nan", "scaled"):
        assert abs(scores[encoding] - scores["uint8-masked"]) <= 0.01, scores
    assert scores["uint8-masked"] > 0.65, scores
    assert scores["unmasked"] > scores["uint8-masked"] - 0.02, scores


def run(capsys, *args) -> tuple[int, str]:
    """(exit status, stdout + stderr) of ``magseg-hpc ARGS`` in this process."""
    try:
        code = main([str(a) for a in args])
    except SystemExit as e:  # argparse's own refusals
        code = e.code
    out, err = capsys.readouterr()
    return code, out + err


def test_ingest_and_info_record_and_name_the_outside(encodings, tmp_path, capsys):
    """A NaN-masked reconstruction is a mask, not an error; a mask file is folded in."""
    image, truth = encodings["signed-nan"]
    np.save(tmp_path / "nan.npy", image)
    code, out = run(capsys, "ingest", tmp_path / "nan.npy", tmp_path / "nan.zarr")
    assert code == 0, out
    assert "outside masked with NaN" in out
    code, out = run(capsys, "info", tmp_path / "nan.zarr")
    assert code == 0 and "outside      outside masked with NaN (stored)" in out, out

    unmasked = encodings["unmasked"][0]
    np.save(tmp_path / "raw.npy", unmasked)
    np.save(tmp_path / "mask.npy", (truth > 0).astype(np.uint8))
    code, out = run(capsys, "ingest", tmp_path / "raw.npy", tmp_path / "masked.zarr",
                    "--mask", tmp_path / "mask.npy")
    assert code == 0, out
    stored = np.asarray(open_volume(tmp_path / "masked.zarr"))
    np.testing.assert_array_equal(np.isnan(stored), truth == 0)
    code, out = run(capsys, "info", tmp_path / "raw.npy")
    assert "not masked" in out
    code, out = run(capsys, "info", tmp_path / "raw.npy", "--outside", "0")
    assert "outside masked at exactly 0 (option)" in out


@pytest.mark.parametrize("args, message", [
    (["--mask", "{tmp}/short.npy"], "shape 4x64x64 differs from the volume's 8x64x64"),
    (["--mask", "{tmp}/complex.npy"], "complex64 voxels are not supported"),
    (["--outside", "maybe"], "choose auto"),
    (["--outside", "0", "--mask", "{tmp}/mask.npy"], "--mask and --outside both"),
])
def test_a_wrong_mask_or_override_is_one_line(encodings, tmp_path, capsys, args, message):
    image, truth = encodings["unmasked"]
    np.save(tmp_path / "raw.npy", image)
    np.save(tmp_path / "mask.npy", (truth > 0).astype(np.uint8))
    np.save(tmp_path / "short.npy", (truth[:4] > 0).astype(np.uint8))
    np.save(tmp_path / "complex.npy", np.full(truth.shape, 1 + 2j, np.complex64))
    argv = [a.format(tmp=tmp_path) for a in args]
    code, out = run(capsys, "ingest", tmp_path / "raw.npy", tmp_path / "out.zarr", *argv)
    assert code == 2, out
    lines = [line for line in out.strip().splitlines() if not line.startswith(("usage", " "))]
    assert len(lines) == 1 and message in lines[0], out
    assert not (tmp_path / "out.zarr").exists()


def test_segment_volume_thresholds_a_nan_masked_input_with_a_mask_file(encodings, tmp_path,
                                                                        capsys):
    image, truth = encodings["unmasked"]
    np.save(tmp_path / "raw.npy", image)
    np.save(tmp_path / "mask.npy", (truth > 0).astype(np.uint8))
    code, out = run(capsys, "segment-volume", tmp_path / "raw.npy", tmp_path / "seg.zarr",
                    "--method", "threshold", "--mask", tmp_path / "mask.npy", "--in-process")
    assert code == 0, out
    labels = np.asarray(open_volume(tmp_path / "seg.zarr", var="labels"))
    assert (labels[truth == 0] == 0).all()  # a mask file is the support, no hull
    assert miou(labels, truth) > 0.65
    provenance = open_group(tmp_path / "seg.zarr").attrs["provenance"]
    assert provenance["options"]["mask"] == str(tmp_path / "mask.npy")
    assert provenance["threshold"]["support"]["outside"] == "nan"


@pytest.fixture(scope="module")
def masked_model(encodings, tmp_path_factory) -> Path:
    """A tiny model trained (2 iterations) on the 8-bit masked encoding, labels included."""
    from magseg_hpc.config import config_from_dict
    from magseg_hpc.train import run_training
    from magseg_hpc.volume.store import write_image_store

    work = tmp_path_factory.mktemp("masked_model")
    image, truth = encodings["uint8-masked"]
    write_image_store(work / "train.zarr", image, labels=truth)
    cfg = config_from_dict({
        "name": "tiny-support", "seed": 0, "model": {**TINY_MODEL, "norm": "auto"},
        "data": {"volume": str(work / "train.zarr"), "n_labeled": 3, "n_val": 2},
        "train": {"batch_size": 2, "crop_size": 32, "epochs": 2, "max_iters": 2,
                  "checkpoint_every": 2, "eval_every": 2, "log_every": 1, "lr": 0.01,
                  "device": "cpu", "threads": 1}})
    run_training(cfg, work / "run")
    return work / "run" / "best.pt"


def test_a_model_moves_between_encodings_and_refuses_an_unknown_outside(
        masked_model, encodings, tmp_path, capsys, caplog):
    """Trained on 8-bit masked data: a signed copy is segmented with the outside marked as in
    training; an unmasked copy (no outside to mark) is refused in one line, nothing written."""
    import torch

    ckpt = torch.load(masked_model, weights_only=True)
    assert ckpt["normalization"]["support"]["value"] == 0.0
    assert ckpt["model"]["norm"] == "group"  # model.norm auto: a masked volume
    for encoding in ("signed", "unmasked"):
        np.save(tmp_path / f"{encoding}.npy", encodings[encoding][0])
    code, out = run(capsys, "segment-volume", tmp_path / "signed.npy", tmp_path / "s.zarr",
                    "--model", masked_model, "--in-process")
    assert code == 0, out
    labels = np.asarray(open_volume(tmp_path / "s.zarr", var="labels"))
    outside = outside_planes(encodings["signed"][0], {"outside": "value", "value": 0.0})
    assert outside.mean() > 0.3 and (labels[outside] == 0).all()  # from the input's support
    # the same sample, another encoding: no warning
    assert not [r for r in caplog.records if "distributed unlike" in r.getMessage()]
    # another contrast (exp: the dark domains squeezed against the outside's level) is
    # segmented with one warning line that says what differs and what to do
    np.save(tmp_path / "contrast.npy", np.exp(2.0 * encodings["signed"][0]))
    code, out = run(capsys, "segment-volume", tmp_path / "contrast.npy", tmp_path / "c.zarr",
                    "--model", masked_model, "--in-process")
    warned = [r.getMessage() for r in caplog.records if "distributed unlike" in r.getMessage()]
    assert code == 0 and len(warned) == 1, out
    assert "label a few slices of this volume" in warned[0], warned
    code, out = run(capsys, "segment-volume", tmp_path / "unmasked.npy", tmp_path / "u.zarr",
                    "--model", masked_model, "--in-process")
    assert code == 2 and "no outside was found in this input" in out, out
    assert "--mask PATH or --outside VALUE" in out and len(out.strip().splitlines()) == 1, out
    assert not (tmp_path / "u.zarr").exists()
    # suggest-slices reads the same decision: refused alike, and runs given the mask file
    np.save(tmp_path / "mask.npy", (~outside).astype(np.uint8))
    suggest = ["suggest-slices", tmp_path / "unmasked.npy", "--model", masked_model, "--n", "2",
               "-o", tmp_path / "next.txt", "--in-process"]
    code, out = run(capsys, *suggest)
    assert code == 2 and "--mask PATH or --outside VALUE" in out, out
    code, out = run(capsys, *suggest, "--mask", tmp_path / "mask.npy")
    assert code == 0 and (tmp_path / "next.txt").is_file(), out


def test_a_field_of_view_circle_is_not_the_outside_but_a_tight_mask_is(encodings):
    """Zeros beyond a back-projection's circle leave the sample's outside noisy: unmasked.
    A sample filling most of the plane, masked to 0 around it, is masked."""
    image = encodings["unmasked"][0].copy()
    yy, xx = np.mgrid[:64, :64]
    image[:, np.hypot(yy - 31.5, xx - 31.5) > 32] = 0.0
    found = detect_support(image)
    assert found["outside"] == "none" and "field of view" in found["source"]
    tight = np.ones((4, 40, 40), np.float32) + np.random.default_rng(0).random((4, 40, 40))
    tight[:, [0, 1, -2, -1], :] = 0.0
    tight[:, :, [0, 1, -2, -1]] = 0.0  # 19 % of the plane, all of its border
    assert detect_support(tight)["value"] == 0.0
