"""The class table: names and painting colours of the label values, shared by every stage;
and the display palette, how pictures draw the classes."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from magseg_hpc.errors import MagsegError

IGNORE_LABEL = 255  # unlabelled pixels in training masks; never a class

# How pictures draw the classes (previews, evaluation figures, TensorBoard panels, benchmark
# pictures), by class value: the colour-blind-safe colours of Okabe & Ito, ordered so that
# the default table's three classes, outside / domain_minus / domain_plus, are black, blue and
# yellow: apart in lightness (L* 0, 46 and 89, so in grey too) and under protan, deutan and
# tritan vision (tests/test_palette.py). These are not the class table's colours: those are
# how masks are painted (export-slices, import-masks, the manifest) and stay as users paint.
DISPLAY_COLORS = (
    (0, 0, 0),  # black
    (0, 114, 178),  # blue
    (240, 228, 66),  # yellow
    (230, 159, 0),  # orange
    (86, 180, 233),  # sky blue
    (0, 158, 115),  # bluish green
    (213, 94, 0),  # vermillion
    (204, 121, 167),  # reddish purple
)
IGNORE_COLOR = (165, 165, 165)  # unlabelled (255) pixels in pictures: L* 68, between the two
UNKNOWN_COLOR = (255, 255, 255)  # a value beyond the class table, in pictures


@dataclass(frozen=True)
class ClassTable:
    names: tuple[str, ...]
    colors: tuple[tuple[int, int, int], ...]

    def __post_init__(self) -> None:
        if len(self.names) != len(self.colors):
            raise MagsegError(
                f"class table has {len(self.names)} names but {len(self.colors)} colours; "
                "give one [r, g, b] colour per class"
            )
        if not 1 <= len(self.names) < IGNORE_LABEL:
            raise MagsegError(f"class table needs 1 to 254 classes, got {len(self.names)}")
        if len(set(self.names)) != len(self.names):
            raise MagsegError(f"class names must be unique, got {list(self.names)}")

    @property
    def num_classes(self) -> int:
        return len(self.names)

    @property
    def display_colors(self) -> tuple[tuple[int, int, int], ...]:
        """Each class's colour in pictures: DISPLAY_COLORS by value (again from the first
        after the eighth), whatever the table's painting colours."""
        return tuple(DISPLAY_COLORS[i % len(DISPLAY_COLORS)] for i in range(self.num_classes))

    def rgb(self, labels: np.ndarray, ignore: int | None = IGNORE_LABEL) -> np.ndarray:
        """Labels (uint8-valued, any shape) as an RGB uint8 picture in the display colours;
        ``ignore`` grey (pass None to draw it white like any value beyond the table)."""
        lut = np.full((256, 3), UNKNOWN_COLOR, dtype=np.uint8)
        lut[: self.num_classes] = np.asarray(self.display_colors, dtype=np.uint8)
        if ignore is not None and 0 <= ignore < 256:
            lut[ignore] = IGNORE_COLOR
        return lut[labels.astype(np.uint8)]

    def legend(self, unlabelled: bool = True) -> list[tuple[str, tuple[int, int, int]]]:
        """(name, colour) of each class as pictures draw it, then, with ``unlabelled``, the
        unlabelled pixels': the one legend of every picture."""
        rows = list(zip(self.names, self.display_colors, strict=True))
        return rows + ([("unlabelled", IGNORE_COLOR)] if unlabelled else [])

    @classmethod
    def default(cls) -> ClassTable:
        # The original study's labelling colours: purple outside, blue and red domains.
        return cls(
            names=("background", "domain_minus", "domain_plus"),
            colors=((149, 0, 255), (30, 0, 255), (255, 0, 0)),
        )

    def to_dict(self) -> dict:
        return {"names": list(self.names), "colors": [list(c) for c in self.colors]}

    @classmethod
    def from_dict(cls, d: dict) -> ClassTable:
        try:
            names = tuple(str(n) for n in d["names"])
            colors = tuple(tuple(int(v) for v in c) for c in d["colors"])
        except (KeyError, TypeError, ValueError) as e:
            raise MagsegError(
                f"invalid class table {d!r}; expected "
                "{{'names': [...], 'colors': [[r, g, b], ...]}}"
            ) from e
        if any(len(c) != 3 or not all(0 <= v <= 255 for v in c) for c in colors):
            raise MagsegError(f"class colours must be [r, g, b] in 0..255, got {d['colors']!r}")
        return cls(names=names, colors=colors)  # type: ignore[arg-type]


# --- pictures: a row of captioned pictures and the palette's legend -------------------------

WHITE, BLACK = (255, 255, 255), (0, 0, 0)
CAPTION_FONT_PX = 15  # the smallest caption and legend text; larger on wide pictures, which
# TensorBoard shows shrunk to its cards' width


def strip_px(font_px: int = CAPTION_FONT_PX) -> int:
    """The height of a caption or legend strip for text of ``font_px``."""
    return round(font_px * 1.75)


CAPTION_PX = strip_px()


def _font(size: int = CAPTION_FONT_PX):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: its small bitmap font
        return ImageFont.load_default()


def legend_strip(table: ClassTable, width: int, unlabelled: bool = True,
                 font_px: int = CAPTION_FONT_PX) -> np.ndarray:
    """(strip_px(font_px), max(width, what it needs), 3) uint8 on white: a swatch and the
    name of each class in the display palette (table.legend()), left to right."""
    from PIL import Image, ImageDraw

    height = strip_px(font_px)
    font, box, pad = _font(font_px), height - 10, font_px // 2
    rows = table.legend(unlabelled)
    need = pad + sum(box + 4 + int(font.getlength(name)) + 3 * pad for name, _ in rows)
    sheet = Image.new("RGB", (max(width, need), height), WHITE)
    draw, x = ImageDraw.Draw(sheet), pad
    for name, colour in rows:
        draw.rectangle((x, 5, x + box, 5 + box), fill=tuple(colour), outline=(90, 90, 90))
        x += box + 4
        draw.text((x, height // 2), name, fill=BLACK, font=font, anchor="lm")
        x += int(font.getlength(name)) + 3 * pad
    return np.asarray(sheet)


def captioned_row(pictures: list[tuple[str, np.ndarray]], table: ClassTable, *,
                  min_height: int = 256, gap: int = 8) -> np.ndarray:
    """(H, W, 3) uint8: RGB ``pictures`` of one shape side by side, each under its title,
    enlarged by a whole factor (nearest neighbour, so each pixel stays a square of one
    colour) to at least ``min_height`` rows, with the palette's legend below; the text is
    1/32 of the row's width (at least CAPTION_FONT_PX), readable where the row is shrunk."""
    from PIL import Image, ImageDraw

    rows, cols = pictures[0][1].shape[:2]
    k = max(1, -(-min_height // max(rows, 1)))
    tiles = [np.kron(np.asarray(p, np.uint8), np.ones((k, k, 1), np.uint8)) for _, p in pictures]
    row_width = len(tiles) * cols * k + (len(tiles) - 1) * gap
    font_px = max(CAPTION_FONT_PX, row_width // 32)
    top = strip_px(font_px)
    legend = legend_strip(table, row_width, font_px=font_px)
    width = max(row_width, legend.shape[1])
    sheet = Image.new("RGB", (width, top + rows * k + legend.shape[0]), WHITE)
    draw, font = ImageDraw.Draw(sheet), _font(font_px)
    for i, ((title, _), tile) in enumerate(zip(pictures, tiles, strict=True)):
        x = i * (cols * k + gap)
        sheet.paste(Image.fromarray(tile), (x, top))
        draw.text((x + cols * k // 2, top // 2), title, fill=BLACK, font=font, anchor="mm")
    sheet.paste(Image.fromarray(legend), (0, top + rows * k))
    return np.asarray(sheet)
