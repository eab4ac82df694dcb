"""Label the published sweep the way a user does, with the project's labelling loop.

    .venv/bin/python benchmarks/real/label_sweep.py WORKDIR [--gif PATH]

1. ``magseg-hpc ingest`` the study's GIF into WORKDIR/sweep.zarr;
2. ``magseg-hpc export-slices --n 10``: ten z slices spread over the volume, with the manifest
   (colour table) to paint with;
3. paint each exported slice with ``paint.clear_labels`` (the unambiguous pixels only; see
   paint.py) into a colour PNG in the manifest's colours: benchmarks/real/sweep_masks/,
   kept in the repository;
4. ``magseg-hpc import-masks --like``: WORKDIR/labels.zarr, the ten painted slices, every
   other slice unlabelled (255).

The masks are written only when missing (``--repaint`` redoes them), so the committed masks
are what every run imports.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from paint import clear_labels  # noqa: E402

from magseg_hpc.volume.io import open_volume  # noqa: E402

HERE = Path(__file__).parent
MASKS = HERE / "sweep_masks"
DEFAULT_GIF = HERE.parents[2] / "shared" / "data" / "magnetization_domain_sweep.gif"
N_SLICES = 10


def magseg(*args) -> None:
    cmd = [str(Path(sys.executable).parent / "magseg-hpc"), *map(str, args)]
    print("$ magseg-hpc", *args, flush=True)
    subprocess.run(cmd, check=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("workdir", type=Path)
    p.add_argument("--gif", type=Path, default=DEFAULT_GIF)
    p.add_argument("--repaint", action="store_true", help="paint the masks again")
    a = p.parse_args()
    a.workdir.mkdir(parents=True, exist_ok=True)
    volume, paint_dir = a.workdir / "sweep.zarr", a.workdir / "paint"
    if not volume.exists():
        magseg("ingest", a.gif, volume)
    magseg("export-slices", volume, paint_dir, "--n", N_SLICES, "--overwrite")
    manifest = json.loads((paint_dir / "manifest.json").read_text())
    colours = np.array(list(manifest["colors"].values()) + [[128, 128, 128]], np.uint8)
    if a.repaint or not MASKS.exists():
        MASKS.mkdir(exist_ok=True)
        image = open_volume(volume)
        for index, name in zip(manifest["indices"], manifest["files"]):
            labels = clear_labels(np.asarray(image[index]))
            # 255 (unlabelled) -> grey, a colour outside the table: import-masks makes it 255
            rgb = colours[np.where(labels == 255, len(colours) - 1, labels)]
            Image.fromarray(rgb).save(MASKS / name)
    magseg("import-masks", MASKS, a.workdir / "labels.zarr", "--colors",
           paint_dir / "manifest.json", "--like", volume, "--overwrite")


if __name__ == "__main__":
    main()
