"""The display palette (classes.DISPLAY_COLORS): how every picture draws the classes.

Outside, domain_minus, domain_plus and unlabelled pixels stay apart in grey and for the common
colour-vision deficiencies (simulated with the full-severity matrices of Machado, Oliveira &
Fernandes 2009 in linear RGB, compared in CIELAB); the class table's painting colours, a data
convention of masks and exports, are not touched; pictures draw with the palette."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from magseg_hpc.classes import (
    DISPLAY_COLORS,
    IGNORE_COLOR,
    IGNORE_LABEL,
    ClassTable,
    captioned_row,
    legend_strip,
)

CVD = {
    "normal vision": np.eye(3),
    "protanopia": [[0.152286, 1.052583, -0.204868], [0.114503, 0.786281, 0.099216],
                   [-0.003882, -0.048116, 1.051998]],
    "deuteranopia": [[0.367322, 0.860646, -0.227968], [0.280085, 0.672501, 0.047413],
                     [-0.011820, 0.042940, 0.968881]],
    "tritanopia": [[1.255528, -0.076749, -0.178779], [-0.078411, 0.930809, 0.147602],
                   [0.004733, 0.691367, 0.303900]],
}


def linear(rgb) -> np.ndarray:
    c = np.asarray(rgb, float) / 255
    return np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)


def lab(lin: np.ndarray) -> np.ndarray:
    xyz = np.clip(lin, 0, 1) @ np.array([[0.4124, 0.3576, 0.1805], [0.2126, 0.7152, 0.0722],
                                         [0.0193, 0.1192, 0.9505]]).T
    t = xyz / np.array([0.95047, 1.0, 1.08883])
    f = np.where(t > (6 / 29) ** 3, np.cbrt(t), t / (3 * (6 / 29) ** 2) + 4 / 29)
    return np.array([116 * f[1] - 16, 500 * (f[0] - f[1]), 200 * (f[1] - f[2])])


def shown() -> dict[str, tuple[int, int, int]]:
    return dict(ClassTable.default().legend())


@pytest.mark.parametrize("vision", CVD)
def test_classes_stay_apart_for_colour_vision_deficiencies(vision):
    colours = {n: lab(np.asarray(CVD[vision]) @ linear(c)) for n, c in shown().items()}
    for (a, ca), (b, cb) in itertools.combinations(colours.items(), 2):
        assert np.linalg.norm(ca - cb) > 25, (vision, a, b)  # CIE76: 2.3 is just noticeable


def test_classes_stay_apart_in_grey():
    lightness = {n: lab(linear(c))[0] for n, c in shown().items()}
    assert lightness["background"] < 1  # the outside is black
    for (a, la), (b, lb) in itertools.combinations(lightness.items(), 2):
        assert abs(la - lb) > 15, (a, b, lightness)


def test_the_painting_colours_stay_the_data_convention():
    table = ClassTable.default()
    assert table.colors == ((149, 0, 255), (30, 0, 255), (255, 0, 0))  # masks are painted so
    assert table.display_colors == DISPLAY_COLORS[:3]
    custom = ClassTable(("air", "up"), ((1, 2, 3), (4, 5, 6)))
    assert custom.display_colors == DISPLAY_COLORS[:2]  # pictures draw any table alike


def test_pictures_draw_with_the_palette_and_its_legend():
    table = ClassTable.default()
    labels = np.array([[0, 1, 2, IGNORE_LABEL, 7]], np.uint8)
    assert [tuple(c) for c in table.rgb(labels)[0]] == [
        *DISPLAY_COLORS[:3], IGNORE_COLOR, (255, 255, 255)]  # beyond the table: white
    strip = legend_strip(table, 100)
    colours = {tuple(c) for c in strip.reshape(-1, 3)}
    assert set(DISPLAY_COLORS[:3]) | {IGNORE_COLOR} <= colours and strip.shape[1] > 100
    row = captioned_row([("a", table.rgb(labels)), ("b", table.rgb(labels))], table,
                        min_height=20, gap=2)
    assert row.shape[0] == 2 * 26 + 20  # caption, 20x enlarged row, legend


def test_evaluation_figures_draw_with_the_palette(tmp_path):
    import xarray as xr
    from PIL import Image

    from magseg_hpc.evaluate import evaluate_volumes, write_figures

    truth = np.zeros((2, 24, 24), np.uint8)
    truth[:, 8:16] = 1
    truth[:, 16:] = 2
    pred = truth.copy()
    pred[:, :4] = 2
    ev = evaluate_volumes(pred, truth, ClassTable.default())
    written = write_figures(tmp_path, ev, xr.DataArray(pred), xr.DataArray(truth), slices=[0])
    picture = np.asarray(Image.open(written[0]).convert("RGB")).reshape(-1, 3)
    colours = {tuple(c) for c in picture}
    assert set(DISPLAY_COLORS[:3]) <= colours
    assert not {(149, 0, 255), (30, 0, 255), (255, 0, 0)} & colours  # not the painting ones
