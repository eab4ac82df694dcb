"""Preview pictures: size, slice choice, label overlay, refused indices."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from magseg_hpc.data.phantom import make_phantom, write_phantom
from magseg_hpc.errors import MagsegError
from magseg_hpc.volume.preview import preview_size, render_preview

SHAPE = (7, 30, 41)


@pytest.fixture(scope="module")
def phantom_store(tmp_path_factory):
    path = tmp_path_factory.mktemp("pv") / "ph.zarr"
    write_phantom(path, make_phantom(SHAPE, seed=1))
    return path


@pytest.mark.parametrize("axis, index, slice_shape", [
    ("z", None, (30, 41)), ("y", 3, (7, 41)), ("x", 40, (7, 30)),
])
def test_png_written_with_expected_size(tmp_path, phantom_store, axis, index, slice_shape):
    out = tmp_path / "p.png"
    summary = render_preview(phantom_store, out, axis=axis, index=index, width_px=500)
    assert summary["index"] == (SHAPE[0] // 2 if index is None else index)
    with Image.open(out) as im:
        assert im.format == "PNG"
        assert im.size == preview_size(slice_shape, 500) == summary["size_px"]


def test_labels_overlaid_in_class_colours(tmp_path, phantom_store):
    plain, overlaid = tmp_path / "a.png", tmp_path / "b.png"
    render_preview(phantom_store, plain, index=3)
    render_preview(phantom_store, overlaid, index=3, labels=phantom_store, alpha=0.6)
    a = np.asarray(Image.open(plain).convert("RGB")).astype(int)
    b = np.asarray(Image.open(overlaid).convert("RGB")).astype(int)
    assert a.shape == b.shape
    grey = np.abs(a[..., 0] - a[..., 2]).max()
    assert grey <= 2  # no overlay: only greys (and black text)
    # Yellow (domain_plus, in the display palette) pixels appear with the overlay.
    yellowish = ((b[..., 0] - b[..., 2] > 80) & (b[..., 1] - b[..., 2] > 80)).sum()
    assert yellowish > 100
    # the painting colours (the study's purple, blue and red) are not what pictures draw
    purple = ((b[..., 2] - b[..., 1] > 80) & (b[..., 0] - b[..., 1] > 40)).sum()
    assert purple == 0


def test_out_of_range_index_is_refused(tmp_path, phantom_store):
    out = tmp_path / "p.png"
    with pytest.raises(MagsegError, match=r"--z 7 is out of range; the volume has z = 0\.\.6"):
        render_preview(phantom_store, out, axis="z", index=7)
    with pytest.raises(MagsegError, match=r"x = 0\.\.40"):
        render_preview(phantom_store, out, axis="x", index=-1)
    assert not out.exists()


def test_labels_of_another_shape_are_refused(tmp_path, phantom_store):
    other = tmp_path / "other.zarr"
    write_phantom(other, make_phantom((7, 30, 40), seed=1))
    with pytest.raises(MagsegError, match="labels have shape"):
        render_preview(phantom_store, tmp_path / "p.png", labels=other)


def test_cli_preview(tmp_path, phantom_store, cli):
    out = tmp_path / "sub" / "p.png"
    r = cli("preview", phantom_store, "--y", "10", "--labels", phantom_store, "-o", out)
    assert r.returncode == 0, r.stderr
    assert out.exists()
    r = cli("preview", phantom_store, "--z", "99", "-o", tmp_path / "q.png")
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        "magseg-hpc: error: --z 99 is out of range; the volume has z = 0..6"
    ]
    assert not (tmp_path / "q.png").exists()


def test_cli_preview_missing_path_and_bad_output(tmp_path, phantom_store, capsys):
    from magseg_hpc.cli import main

    assert main(["preview", str(tmp_path / "nope.zarr"), "-o", str(tmp_path / "p.png")]) == 2
    assert "no such file or directory" in capsys.readouterr().err
    assert main(["preview", str(phantom_store), "-o", str(tmp_path / "p.jpg")]) == 2
    assert "must be a .png file" in capsys.readouterr().err
