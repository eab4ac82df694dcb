"""Colour-mask import: colours to classes, unknown colours to 255 and counted, bad input."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import xarray as xr
from PIL import Image

from magseg_hpc.classes import ClassTable
from magseg_hpc.data.masks import colors_to_class_table, import_masks, load_colors
from magseg_hpc.errors import MagsegError
from magseg_hpc.volume.store import open_labels

COLORS = {"background": [149, 0, 255], "domain_minus": [30, 0, 255], "domain_plus": [255, 0, 0]}
PALETTE = np.array(list(COLORS.values()), dtype=np.uint8)


def _masks(folder, n=5, shape=(23, 17), seed=0, unknown=7):
    """Write n colour masks; return the expected labels with `unknown` odd pixels per slice."""
    rng = np.random.default_rng(seed)
    folder.mkdir()
    truth = rng.integers(0, 3, size=(n, *shape)).astype(np.uint8)
    for z in range(n):
        rgb = PALETTE[truth[z]]
        idx = rng.choice(truth[z].size, size=unknown, replace=False)
        rows, cols = np.unravel_index(idx, shape)
        rgb[rows, cols] = (90, 0, 255)  # an anti-aliased purple/blue edge colour
        truth[z, rows, cols] = 255
        # Names sort by name: slice_00 .. slice_04
        Image.fromarray(rgb).save(folder / f"slice_{z:02d}.png")
    return truth


@pytest.fixture
def colors_file(tmp_path):
    path = tmp_path / "colors.json"
    path.write_text(json.dumps(COLORS))
    return path


def test_import_round_trip_with_unknown_colours(tmp_path, colors_file, caplog):
    truth = _masks(tmp_path / "masks", unknown=7)
    out = tmp_path / "labels.zarr"
    with caplog.at_level(logging.WARNING):
        result = import_masks(tmp_path / "masks", out, load_colors(colors_file))
    assert result.shape == truth.shape
    assert result.unknown == 5 * 7
    assert result.unknown_colors == [((90, 0, 255), 35)]
    pct = 100 * 35 / truth.size
    assert f"35 of {truth.size} pixels ({pct:.2f}%)" in caplog.text
    assert result.counts == {n: int((truth == i).sum()) for i, n in enumerate(COLORS)}

    labels, table = open_labels(out)
    assert labels.dims == ("z", "y", "x")
    np.testing.assert_array_equal(labels.values, truth)
    assert table == ClassTable.default()
    ds = xr.open_zarr(out)
    assert ds.attrs["provenance"]["source"] == str((tmp_path / "masks").resolve())
    assert ds.attrs["magseg_hpc"]["complete"] is True


def test_palette_and_rgba_masks_are_read_as_rgb(tmp_path, colors_file):
    folder = tmp_path / "masks"
    folder.mkdir()
    truth = np.array([[0, 1], [2, 1]], dtype=np.uint8)
    Image.fromarray(PALETTE[truth]).convert("RGBA").save(folder / "a.png")
    Image.fromarray(PALETTE[truth]).convert("P", palette=Image.Palette.ADAPTIVE).save(
        folder / "b.png"
    )
    result = import_masks(folder, tmp_path / "l.zarr", load_colors(colors_file))
    assert result.unknown == 0
    np.testing.assert_array_equal(open_labels(tmp_path / "l.zarr")[0].values, [truth, truth])


def test_transparent_pixels_are_unlabelled_not_their_hidden_colour(tmp_path, colors_file):
    """Alpha 0 is unpainted: 255 whatever RGB the file keeps under it (here a class colour),
    and not an unknown colour either; painted pixels keep their class."""
    folder = tmp_path / "masks"
    folder.mkdir()
    truth = np.array([[0, 1], [2, 1]], dtype=np.uint8)
    rgba = np.concatenate([PALETTE[truth], np.full((2, 2, 1), 255, np.uint8)], axis=-1)
    rgba[0, 1, 3] = 0  # domain_minus's colour under a transparent pixel
    Image.fromarray(rgba, "RGBA").save(folder / "a.png")
    result = import_masks(folder, tmp_path / "l.zarr", load_colors(colors_file))
    assert result.unknown == 0 and result.counts["domain_minus"] == 1
    np.testing.assert_array_equal(open_labels(tmp_path / "l.zarr")[0].values,
                                  [[[0, 255], [2, 1]]])


@pytest.mark.parametrize(
    "data",
    [
        [[149, 0, 255], [30, 0, 255], [255, 0, 0]],
        [
            {"name": "background", "color": "#9500ff"},
            {"name": "domain_minus", "color": [30, 0, 255]},
            {"name": "domain_plus", "color": "#ff0000"},
        ],
        {"names": list(COLORS), "colors": list(COLORS.values())},
    ],
)
def test_colour_table_forms(data):
    assert colors_to_class_table(data) == ClassTable.default()


def test_yaml_colour_file(tmp_path):
    path = tmp_path / "colors.yaml"
    path.write_text("outside: [0, 0, 0]\nup: [255, 255, 255]\n")
    table = load_colors(path)
    assert table.names == ("outside", "up") and table.colors == ((0, 0, 0), (255, 255, 255))


@pytest.mark.parametrize(
    "text, words",
    [
        ("{not: [valid", "not valid YAML or JSON"),
        ('{"background": [149, 0]}', "give \\[r, g, b\\]"),
        ('{"background": [300, 0, 0]}', "0..255"),
        ('"purple"', "expected a mapping"),
        ('{"a": [1, 2, 3], "b": [1, 2, 3]}', "share a colour"),
    ],
)
def test_bad_colour_files(tmp_path, text, words):
    path = tmp_path / "colors.yaml"
    path.write_text(text)
    with pytest.raises(MagsegError, match=words) as e:
        load_colors(path)
    assert "\n" not in str(e.value)


def test_bad_mask_folders(tmp_path, colors_file):
    table = load_colors(colors_file)
    out = tmp_path / "l.zarr"
    (tmp_path / "empty").mkdir()
    with pytest.raises(MagsegError, match="no .png masks"):
        import_masks(tmp_path / "empty", out, table)
    with pytest.raises(MagsegError, match="no such folder"):
        import_masks(tmp_path / "missing", out, table)

    mixed = tmp_path / "mixed"
    mixed.mkdir()
    Image.new("RGB", (8, 6)).save(mixed / "a.png")
    Image.new("RGB", (8, 7)).save(mixed / "b.png")
    with pytest.raises(MagsegError, match=r"b.png: mask is 8x7 .* a.png is 8x6"):
        import_masks(mixed, out, table)

    fake = tmp_path / "fake"
    fake.mkdir()
    Image.new("RGB", (8, 6)).save(fake / "a.png", format="JPEG")
    with pytest.raises(MagsegError, match="JPEG image with a .png name"):
        import_masks(fake, out, table)
    (fake / "a.png").write_text("hello")
    with pytest.raises(MagsegError, match="not a readable PNG"):
        import_masks(fake, out, table)
    assert not out.exists()


def test_cli_import_masks(tmp_path, colors_file, cli):
    truth = _masks(tmp_path / "masks", n=3, unknown=4)
    out = tmp_path / "labels.zarr"
    r = cli("import-masks", tmp_path / "masks", out, "--colors", colors_file)
    assert r.returncode == 0, r.stderr
    assert "12 of" in r.stderr and "set to 255" in r.stderr  # the warning reaches the user
    np.testing.assert_array_equal(xr.open_zarr(out)["labels"].values, truth)

    r = cli("import-masks", tmp_path / "masks", out, "--colors", colors_file)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        f"magseg-hpc: error: {out} already exists; pass --overwrite to replace it"
    ]


def test_cli_import_masks_bad_colours_writes_nothing(tmp_path):
    from magseg_hpc.cli import main

    _masks(tmp_path / "masks", n=2)
    bad = tmp_path / "colors.json"
    bad.write_text('{"background": "purple"}')
    out = tmp_path / "labels.zarr"
    assert main(["import-masks", str(tmp_path / "masks"), str(out), "--colors", str(bad)]) == 2
    assert not out.exists()
