"""The recipe on real data: the study's published sweep (213 x 600 x 600, 8-bit, masked).

As a user would: label ten z slices with the labelling loop (``real/label_sweep.py``: export,
paint the unambiguous pixels, import), train ``--config`` (default cpu_best, as shipped) on
them, 2 of them held out for validation, and segment the whole volume with ``segment-volume``
(``--axes auto``), once per seed; the threshold baseline once. Then, on every z slice that was
not painted (203 held-out slices):

- mIoU and per-class IoU of each against the slice's clear voxels (``real/paint.py``: what a
  physicist labels without doubt; 255 elsewhere), and the agreement of each model with the
  baseline on those voxels;
- the validation curve of each training (a plot) and its largest drop below the running best
  after the supervised-only epochs (a collapse, as training itself reports it);
- the time of each training and segmentation;
- pictures of held-out slices: image, baseline, model.

    .venv/bin/python benchmarks/bench_real.py --work /tmp/real --seeds 2,3,4

Seeds: 0 and 1 tuned (``data.mark_outside`` and ``model.norm: group`` were chosen on seed 0,
whose validation swung 0.90 -> 0.70 -> 0.89 with BatchNorm, and checked on seed 1;
``train.ema_schedule: mean_teacher`` and ``train.uns_rampup_epochs: 2`` on seed 1, whose
validation fell from 0.97 to 0.78 at the switch to pseudo-labels without them); the tables
report seeds no choice saw.
Writes ``benchmarks/results/real_sweep.md`` (and ``.json``, ``real_sweep_curves.png``,
``real_sweep_slices.png``).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent / "real"))

from _results import RESULTS, ROOT, write_results  # noqa: E402
from paint import clear_labels  # noqa: E402

from magseg_hpc.classes import IGNORE_LABEL, ClassTable, legend_strip  # noqa: E402
from magseg_hpc.metrics import confusion_matrix, scores_from_confusion  # noqa: E402
from magseg_hpc.volume.io import open_volume  # noqa: E402

NAMES = ClassTable.default().names
PICTURE_SLICES = (42, 128, 170)  # held out (real/label_sweep.py paints 10, 31, 53, ...)


def run(*args, log: Path | None = None) -> float:
    """Run a command from the repository root; its seconds."""
    started = time.perf_counter()
    out = open(log, "w") if log else None  # noqa: SIM115
    try:
        subprocess.run([str(a) for a in args], cwd=ROOT, check=True, stdout=out,
                       stderr=subprocess.STDOUT if out else None)
    finally:
        if out:
            out.close()
    return time.perf_counter() - started


def magseg(*args, log: Path | None = None) -> float:
    return run(Path(sys.executable).parent / "magseg-hpc", *args, log=log)


def labels_of(store: Path) -> np.ndarray:
    return np.asarray(open_volume(store, var="labels"))


def scores(pred: np.ndarray, truth: np.ndarray) -> dict:
    s = scores_from_confusion(confusion_matrix(pred, truth, len(NAMES), ignore=IGNORE_LABEL))
    return {"miou": s["miou"], "iou": dict(zip(NAMES, s["iou"], strict=True))}


def curve(run_dir: Path) -> tuple[list[int], list[float]]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "teacher_miou" in r]
    return [r["iteration"] for r in rows], [r["teacher_miou"] for r in rows]


def largest_drop(iters: list[int], mious: list[float], after: int) -> float:
    """The largest fall below the running best at evaluations from iteration ``after`` on."""
    best, drop = -np.inf, 0.0
    for it, m in zip(iters, mious, strict=True):
        if it > after:
            drop = max(drop, best - m)
        best = max(best, m)
    return float(drop)


def colour(labels: np.ndarray) -> np.ndarray:
    """Labels in the display palette every picture uses (magseg_hpc.classes.DISPLAY_COLORS)."""
    return ClassTable.default().rgb(labels)


def pictures(image: np.ndarray, rows: dict[str, np.ndarray], path: Path) -> None:
    from PIL import Image, ImageDraw

    ys, xs = np.nonzero(image.max(axis=0))
    box = (slice(max(ys.min() - 10, 0), ys.max() + 11), slice(max(xs.min() - 10, 0),
                                                            xs.max() + 11))
    tiles = []
    for z in PICTURE_SLICES:
        grey = np.repeat(image[z][box][..., None], 3, axis=2)
        tiles.append(np.concatenate([grey] + [colour(lab[z][box]) for lab in rows.values()],
                                    axis=1))
    sheet = Image.fromarray(np.concatenate(tiles, axis=0)).resize(
        (tiles[0].shape[1] * 2, len(tiles) * tiles[0].shape[0] * 2), Image.NEAREST)
    draw = ImageDraw.Draw(sheet)
    width = 2 * tiles[0].shape[1] // (1 + len(rows))
    for i, name in enumerate(["image", *rows]):
        draw.text((i * width + 4, 4), name, fill=(255, 255, 255), stroke_width=1,
                  stroke_fill=(0, 0, 0))  # white on black: apart from every class colour
    for j, z in enumerate(PICTURE_SLICES):
        draw.text((4, j * 2 * tiles[0].shape[0] + 16), f"z={z}", fill=(255, 255, 255),
                  stroke_width=1, stroke_fill=(0, 0, 0))
    legend = legend_strip(ClassTable.default(), sheet.size[0])  # the palette's legend below
    full = Image.new("RGB", (legend.shape[1], sheet.size[1] + legend.shape[0]), (255, 255, 255))
    full.paste(sheet, (0, 0))
    full.paste(Image.fromarray(legend), (0, sheet.size[1]))
    full.save(path)


def plot_curves(curves: dict[str, tuple[list[int], list[float]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for name, (iters, mious) in curves.items():
        ax.plot(iters, mious, marker="o", label=name)
    ax.set_xlabel("iteration")
    ax.set_ylabel("validation mIoU (teacher)")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def reencoded(image8: np.ndarray, encoding: str, seed: int, work: Path) -> Path:
    """The 8-bit sweep re-encoded as ``bench_encodings.py`` does, with ``seed``'s noise."""
    from bench_encodings import reencode

    from magseg_hpc.volume.support import outside_planes

    path = work / f"{encoding}{seed}.npy"
    outside = outside_planes(image8, {"outside": "value", "value": 0.0})
    np.save(path, reencode(image8, outside, encoding, seed))
    return path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", type=Path, required=True, help="scratch folder (created)")
    p.add_argument("--seeds", default="2,3,4", help="report seeds (0 and 1 tuned the recipe)")
    p.add_argument("--config", default="configs/cpu_best.yaml")
    p.add_argument("--gif", type=Path, default=None, help="the study's sweep GIF")
    p.add_argument("--name", default="real_sweep", help="results file name")
    p.add_argument("--encoding", choices=("signed", "signed-nan", "unmasked"), default=None,
                   help="train and segment the sweep re-encoded as bench_encodings.py does "
                   "(noise, offsets, streaks; each seed's own noise), scored as the 8-bit one")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="config overrides for every training (e.g. train.precision=fp32)")
    a = p.parse_args()
    seeds = [int(s) for s in a.seeds.split(",")]
    work = a.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    run(sys.executable, "benchmarks/real/label_sweep.py", work,
        *(["--gif", a.gif] if a.gif else []))
    volume, label_store = work / "sweep.zarr", work / "labels.zarr"
    image = np.asarray(open_volume(volume))
    painted = set(np.flatnonzero((labels_of(label_store) != IGNORE_LABEL).any(axis=(1, 2))))
    held_out = [z for z in range(image.shape[0]) if z not in painted]
    truth = np.stack([clear_labels(image[z]) for z in held_out])

    if a.encoding:
        volume = reencoded(image, a.encoding, seeds[0], work)
    baseline = work / "threshold.zarr"
    seconds = {"threshold": magseg("segment-volume", volume, baseline, "--method", "threshold",
                                   "--overwrite", log=work / "threshold.log")}
    predicted = {"threshold": labels_of(baseline)}
    results = {"threshold": {**scores(predicted["threshold"][held_out], truth),
                             "segment_seconds": seconds["threshold"]}}
    curves = {}
    for seed in seeds:
        if a.encoding and seed != seeds[0]:
            volume = reencoded(image, a.encoding, seed, work)
        name, run_dir, out = f"seed {seed}", work / f"run{seed}", work / f"seed{seed}.zarr"
        train_s = magseg("train", "--config", a.config, "--output-dir", run_dir,
                         f"data.volume={volume}", f"data.label_volume={label_store}",
                         "data.n_val=2", f"seed={seed}", *a.overrides,
                         log=work / f"train{seed}.log")
        segment_s = magseg("segment-volume", volume, out, "--model", run_dir / "best.pt",
                           "--overwrite", log=work / f"segment{seed}.log")
        predicted[name] = labels_of(out)
        iters, mious = curves[name] = curve(run_dir)
        t = yaml.safe_load((run_dir / "config.yaml").read_text())["train"]
        sup_only = t["sup_only_epochs"] * t["iters_per_epoch"]
        pred = predicted[name][held_out]
        agree = scores(pred, np.where(truth == IGNORE_LABEL, IGNORE_LABEL,
                                      predicted["threshold"][held_out]))
        results[name] = {**scores(pred, truth), "agreement_with_baseline": agree,
                         "train_seconds": train_s, "segment_seconds": segment_s,
                         "validation": dict(zip(iters, mious, strict=True)),
                         "largest_drop_after_sup_only": largest_drop(iters, mious, sup_only)}
        print(name, json.dumps(results[name]), flush=True)

    plot_curves(curves, RESULTS / f"{a.name}_curves.png")
    pictures(image, {"threshold": predicted["threshold"],
                     f"model, seed {seeds[0]}": predicted[f"seed {seeds[0]}"]},
             RESULTS / f"{a.name}_slices.png")

    lines = ["| | mIoU | background | domain_minus (dark) | domain_plus | agreement with "
             "baseline | largest validation drop after sup-only | train s | segment s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        iou = r["iou"]
        lines.append(
            f"| {name} | {r['miou']:.3f} | {iou['background']:.3f} | {iou['domain_minus']:.3f} "
            f"| {iou['domain_plus']:.3f} | "
            + (f"{r['agreement_with_baseline']['miou']:.3f} | "
               f"{r['largest_drop_after_sup_only']:.3f} | {r['train_seconds']:.0f} | "
               if "train_seconds" in r else "- | - | - | ")
            + f"{r['segment_seconds']:.0f} |")
    body = "\n".join([
        f"{len(held_out)} held-out z slices (every slice but the {len(painted)} painted), "
        f"{int((truth != IGNORE_LABEL).sum())} clear voxels "
        f"({', '.join(f'{n} {int((truth == c).sum())}' for c, n in enumerate(NAMES))}). "
        + (f"The sweep re-encoded `{a.encoding}` (`bench_encodings.py`: noise, a per-slice "
           "offset and streaks; the threshold baseline on the first seed's noise, each "
           "training on its seed's), scored on the 8-bit sweep's clear voxels. "
           if a.encoding else "")
        + f"Training: `{a.config}` "
        + (f"with {' '.join(a.overrides)}" if a.overrides else "as shipped")
        + ", 8 painted slices, 2 for validation. Seeds "
        f"{a.seeds} report; seeds 0 and 1 tuned (`data.mark_outside` and `model.norm: group` "
        "on 0, checked on 1; `train.ema_schedule: mean_teacher`, `train.uns_rampup_epochs: 2` "
        "on 1; `train.epochs: 30` on the `tomo` phantom's tuning seeds).", "",
        *lines, "",
        f"Validation curves: `{a.name}_curves.png`; held-out slices {PICTURE_SLICES} "
        f"(image, threshold baseline, model; black outside, blue dark domain, red bright, "
        f"crop around the sample): `{a.name}_slices.png`.",
    ])
    print(write_results(a.name, "Real data: the published sweep", body, results))


if __name__ == "__main__":
    main()
