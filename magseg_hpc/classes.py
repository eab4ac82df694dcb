"""The class table: names and display colours of the label values, shared by every stage."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from magseg_hpc.errors import MagsegError

IGNORE_LABEL = 255  # unlabelled pixels in training masks; never a class
IGNORE_COLOR = (128, 128, 128)  # how unlabelled pixels are drawn


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

    def rgb(self, labels: np.ndarray, ignore: int | None = IGNORE_LABEL) -> np.ndarray:
        """Labels (uint8-valued, any shape) as an RGB uint8 image in the class colours;
        ``ignore`` grey (pass None to draw it black like any value beyond the table)."""
        lut = np.zeros((256, 3), dtype=np.uint8)
        lut[: self.num_classes] = np.asarray(self.colors, dtype=np.uint8)
        if ignore is not None and 0 <= ignore < 256:
            lut[ignore] = IGNORE_COLOR
        return lut[labels.astype(np.uint8)]

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
