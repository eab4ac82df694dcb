"""Where the models' errors are, and how much there is left to win: read a phantom benchmark.

Reads the segmented test volumes that ``bench_phantom.py`` left in its ``--workdir`` (no
training, no segmenting) and splits each method's wrong voxels, counted per thousand labelled
voxels of the held-out test phantom:

- ``sample edge``: background called a domain or a domain called background;
- ``domain vs domain``: domain_minus called domain_plus or the reverse (the magnetization's
  sign, what the physicist wants);
- ``at a boundary``: the share of all wrong voxels that lie within one voxel (26-neighbourhood)
  of a change of the true label, where the phantom's blur (``blur_sigma``) and the
  reconstruction's point spread make the true label ambiguous at its noise level.

Comparing a model trained on 8 labelled slices with the ceiling (all slices labelled, twice
the iterations) shows which kind of error more labels would remove.

    .venv/bin/python benchmarks/bench_phantom.py --presets elongated,sweep --seeds 0,1,2 \
        --ceiling --workdir runs/bench_phantom
    .venv/bin/python benchmarks/bench_headroom.py --workdir runs/bench_phantom

Writes ``benchmarks/results/headroom.md`` (and ``headroom.json``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import zarr
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _results import write_results  # noqa: E402

from magseg_hpc.metrics import confusion_matrix, scores_from_confusion  # noqa: E402

METHODS = {  # bench_phantom.py output name -> row label
    "threshold": "threshold baseline",
    "supervised_fused": "supervised-only, z,y,x fused",
    "augseg_fused": "AugSeg, z,y,x fused",
    "ceiling_fused": "ceiling: all slices labelled, z,y,x fused",
}
UNLABELLED = 255


def near_boundary(truth: np.ndarray) -> np.ndarray:
    """Voxels within one voxel (26-neighbourhood) of a change of the true label."""
    t = truth.astype(np.int16)
    high = ndimage.maximum_filter(t, size=3, mode="nearest")
    low = ndimage.minimum_filter(t, size=3, mode="nearest")
    return high != low


def split_errors(pred: np.ndarray, truth: np.ndarray, boundary: np.ndarray) -> dict:
    """Errors per thousand labelled voxels, by kind, and the mIoU."""
    labelled = truth != UNLABELLED
    wrong = labelled & (pred != truth)
    n = int(labelled.sum())
    domains = (pred > 0) & (truth > 0)
    cm = confusion_matrix(pred, truth, 3, ignore=UNLABELLED)
    return {
        "miou": float(scores_from_confusion(cm)["miou"]),
        "errors_permille": 1000 * wrong.sum() / n,
        "edge_permille": 1000 * (wrong & ~domains).sum() / n,
        "domain_permille": 1000 * (wrong & domains).sum() / n,
        "at_boundary_share": float((wrong & boundary).sum() / max(1, wrong.sum())),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="runs/bench_phantom",
                        help="bench_phantom.py's --workdir (PRESET_seedN folders)")
    parser.add_argument("--presets", default="elongated,sweep")
    parser.add_argument("--seeds", default="0,1,2")
    args = parser.parse_args()
    work = Path(args.workdir)

    raw: dict = {}
    boundary_share: dict[str, list[float]] = {}
    for preset in args.presets.split(","):
        for seed in (int(s) for s in args.seeds.split(",")):
            d = work / f"{preset}_seed{seed}"
            if not (d / "test.zarr").exists():
                sys.exit(f"error: {d}/test.zarr not found; run bench_phantom.py with "
                         f"--workdir {work} first")
            truth = zarr.open_group(str(d / "test.zarr"), mode="r")["labels"][:]
            boundary = near_boundary(truth)
            boundary_share.setdefault(preset, []).append(
                float((boundary & (truth != UNLABELLED)).sum() / (truth != UNLABELLED).sum()))
            for name in METHODS:
                if (d / f"{name}.zarr").exists():
                    pred = zarr.open_group(str(d / f"{name}.zarr"), mode="r")["labels"][:]
                    raw[f"{preset}/seed{seed}/{name}"] = split_errors(pred, truth, boundary)
                    print(preset, seed, name, raw[f"{preset}/seed{seed}/{name}"], flush=True)

    rows = ["| preset | method | seeds | mIoU | wrong voxels (per 1000) | sample edge | "
            "domain vs domain | wrong voxels at a true boundary |",
            "|---|---|---|---|---|---|---|---|"]
    for preset in args.presets.split(","):
        for name, label in METHODS.items():
            runs = [v for k, v in raw.items() if k.startswith(f"{preset}/") and
                    k.endswith(f"/{name}")]
            if not runs:
                continue
            mean = {key: float(np.mean([r[key] for r in runs])) for key in runs[0]}
            rows.append(f"| {preset} | {label} | {len(runs)} | {mean['miou']:.3f} | "
                        f"{mean['errors_permille']:.1f} | {mean['edge_permille']:.1f} | "
                        f"{mean['domain_permille']:.1f} | {mean['at_boundary_share']:.0%} |")
        shares = boundary_share.get(preset, [])
        if shares:
            rows.append(f"| {preset} | (all labelled voxels within one voxel of a true "
                        f"boundary) | {len(shares)} | - | {1000 * np.mean(shares):.0f} "
                        "| - | - | - |")
    body = (
        "Errors of each method on the held-out test phantoms of a `bench_phantom.py` run "
        f"(`{work}`), per thousand labelled voxels, mean over seeds (the ceiling has one "
        "seed). *Sample edge*: background called a domain or the reverse; *domain vs "
        "domain*: the two orientations confused; the last column: the share of all wrong "
        "voxels that lie within one voxel of a change of the true label.\n\n"
        + "\n".join(rows) + "\n")
    path = write_results("headroom", "Where the errors are: sample edge, domains, boundaries",
                         body, {"methods": raw, "boundary_voxels_share": boundary_share})
    print(path.read_text().split("Raw numbers")[0])


if __name__ == "__main__":
    main()
