"""Evaluate a label volume against ground truth, chunk by chunk, and draw the evidence.

The scores come from :mod:`magseg_hpc.metrics` (the same code as training validation):
dataset-level IoU/Dice over the whole volume, the empty-class rule documented there, and
out-of-range predictions (e.g. 255 in a prediction store) counted as errors and reported.
One Dask pass computes a confusion matrix per z slice; the volume total is their sum, so
the per-slice mIoU curve costs nothing extra and the volume never has to fit in memory.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dask
import numpy as np
import xarray as xr

from magseg_hpc.classes import IGNORE_COLOR, IGNORE_LABEL, ClassTable
from magseg_hpc.errors import MagsegError
from magseg_hpc.metrics import miou_from_slices, per_slice_confusion, scores_from_confusion
from magseg_hpc.outputs import check_no_overlap, check_output, tool_store_format
from magseg_hpc.paths import atomic_write, remove_temp_files, volume_file
from magseg_hpc.volume.io import open_volume, reading
from magseg_hpc.volume.store import open_labels

log = logging.getLogger(__name__)

REPORT_FORMAT = "magseg-hpc/evaluation/1"
EMPTY_CLASS_RULE = (
    "IoU = I/U summed over the whole volume; a class absent from both truth and prediction "
    "has IoU and Dice null and is left out of mIoU (AugSeg's I/(U+1e-10) would score it 0)"
)
ERROR_COLOR = (0, 0, 0)


@dataclass
class Evaluation:
    """Everything ``evaluate`` measured; ``confusion`` is (C, C + 1), last column = invalid."""

    class_table: ClassTable
    ignore: int | None
    shape: tuple[int, ...]
    confusion: np.ndarray
    slice_confusion: np.ndarray
    scores: dict[str, Any] = field(init=False)
    per_slice_miou: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self.scores = scores_from_confusion(self.confusion)
        self.per_slice_miou = miou_from_slices(self.slice_confusion)


def load_pair(
    pred_path: str | os.PathLike,
    truth_path: str | os.PathLike,
    *,
    pred_var: str = "labels",
    truth_var: str = "labels",
) -> tuple[xr.DataArray, xr.DataArray, ClassTable]:
    """Open prediction and truth label volumes; refuse shape or class-table disagreements."""
    pred, pred_table = open_labels(pred_path, var=pred_var)
    truth, truth_table = open_labels(truth_path, var=truth_var)
    if tuple(pred.shape) != tuple(truth.shape):
        raise MagsegError(
            f"prediction {pred_path} has shape {'x'.join(map(str, pred.shape))} but truth "
            f"{truth_path} has {'x'.join(map(str, truth.shape))}; evaluate volumes of one sample"
        )
    if pred_table.names != truth_table.names:
        raise MagsegError(
            f"class tables differ: prediction has {list(pred_table.names)}, truth has "
            f"{list(truth_table.names)}; relabel one of them so label values mean the same"
        )
    if pred_table.colors != truth_table.colors:
        log.warning("class colours differ between prediction and truth; using the truth's")
    return pred, truth, truth_table


def evaluate_volumes(
    pred: Any, truth: Any, class_table: ClassTable, *, ignore: int | None = IGNORE_LABEL
) -> Evaluation:
    """Score ``pred`` against ``truth`` (xr.DataArray, dask or numpy; same shape) with Dask."""
    c = class_table.num_classes
    if ignore is not None and 0 <= ignore < c:
        raise MagsegError(
            f"--ignore {ignore} is a class label ({class_table.names[ignore]}); "
            f"use a value >= {c}, e.g. {IGNORE_LABEL}"
        )
    slices = per_slice_confusion(pred, truth, c, ignore, invalid_column=True)
    return Evaluation(
        class_table=class_table,
        ignore=ignore,
        shape=tuple(int(n) for n in truth.shape),
        confusion=slices.sum(axis=0),
        slice_confusion=slices,
    )


def _clean(x: Any) -> Any:
    """NaN -> None so the JSON is strict (json.dump would write NaN, which is not JSON)."""
    if isinstance(x, float) and math.isnan(x):
        return None
    if isinstance(x, list):
        return [_clean(v) for v in x]
    return x


def report_dict(ev: Evaluation, **sources: Any) -> dict:
    s = ev.scores
    return {
        "format": REPORT_FORMAT,
        **sources,
        "shape": list(ev.shape),
        "ignore": ev.ignore,
        "class_table": ev.class_table.to_dict(),
        "classes": [
            {
                "label": i,
                "name": name,
                "iou": _clean(s["iou"][i]),
                "dice": _clean(s["dice"][i]),
                "present": s["present"][i],
                "support": s["support"][i],
            }
            for i, name in enumerate(ev.class_table.names)
        ],
        "miou": _clean(s["miou"]),
        "mean_dice": _clean(s["mean_dice"]),
        "pixel_accuracy": _clean(s["pixel_accuracy"]),
        "labelled_voxels": s["labelled"],
        "invalid_predictions": s["invalid_predictions"],
        "confusion_matrix": {
            "rows": "truth",
            "columns": "prediction; the last column counts predictions outside the class table",
            "values": ev.confusion.tolist(),
        },
        "per_slice_miou": _clean([float(v) for v in ev.per_slice_miou]),
        "empty_class_rule": EMPTY_CLASS_RULE,
    }


def write_report(path: str | os.PathLike, report: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_temp_files(path.parent, [path.name])  # what a killed evaluation's write left
    # a reader never sees half a report
    atomic_write(path, json.dumps(report, indent=2, allow_nan=False) + "\n")


def _fmt(v: float, width: int = 7) -> str:
    return f"{'-':>{width}}" if math.isnan(v) else f"{v:{width}.4f}"


def format_table(ev: Evaluation) -> str:
    """The human-readable summary the CLI prints."""
    s = ev.scores
    names = list(ev.class_table.names)
    w = max(12, *(len(n) for n in names))
    lines = [
        f"{'class':<{w}}  {'IoU':>7}  {'Dice':>7}  {'voxels':>12}",
        "-" * (w + 34),
    ]
    for i, n in enumerate(names):
        note = "" if s["present"][i] else "  (absent: not in mIoU)"
        lines.append(
            f"{n:<{w}}  {_fmt(s['iou'][i])}  {_fmt(s['dice'][i])}  {s['support'][i]:>12}{note}"
        )
    lines += [
        "-" * (w + 34),
        f"{'mIoU':<{w}}  {_fmt(s['miou'])}  {_fmt(s['mean_dice'])}",
        f"pixel accuracy {_fmt(s['pixel_accuracy']).strip()} over {s['labelled']} labelled voxels"
        + (f" (ignore label {ev.ignore} left out)" if ev.ignore is not None else ""),
    ]
    if s["invalid_predictions"]:
        lines.append(
            f"{s['invalid_predictions']} voxels predicted outside the class table (counted wrong)"
        )
    finite = ev.per_slice_miou[~np.isnan(ev.per_slice_miou)]
    if finite.size:
        worst = int(np.nanargmin(ev.per_slice_miou))
        lines.append(
            f"per-slice mIoU: min {finite.min():.4f} (z={worst}), median "
            f"{np.median(finite):.4f}, max {finite.max():.4f}"
        )
    cols = names + (["invalid"] if s["invalid_predictions"] else [])
    cw = max(10, *(len(n) for n in cols))
    lines += ["", "confusion matrix (rows: truth, columns: prediction)"]
    lines.append(" " * w + "  " + "  ".join(f"{n:>{cw}}" for n in cols))
    for i, n in enumerate(names):
        row = ev.confusion[i, : len(cols)]
        lines.append(f"{n:<{w}}  " + "  ".join(f"{int(v):>{cw}}" for v in row))
    return "\n".join(lines)


# --- figures ---------------------------------------------------------------------------------


def default_slices(ev: Evaluation) -> list[int]:
    """The quartiles of the labelled slices plus the worst-scoring one, so users see typical
    and failing cases (not unlabelled slices of a sparsely labelled truth, all grey)."""
    scored = np.flatnonzero(~np.isnan(ev.per_slice_miou))
    if not scored.size:
        scored = np.arange(ev.shape[0])
    n = len(scored)
    picks = [int(scored[i]) for i in (n // 4, n // 2, (3 * n) // 4)]
    if not np.isnan(ev.per_slice_miou).all():
        picks.append(int(np.nanargmin(ev.per_slice_miou)))
    return sorted(set(picks))


def _error_map(pred: np.ndarray, truth: np.ndarray, ignore: int | None) -> np.ndarray:
    # black on white, unlabelled grey as in the class panels
    rgb = np.full(truth.shape + (3,), 255, dtype=np.uint8)
    rgb[pred != truth] = ERROR_COLOR
    if ignore is not None:
        rgb[truth == ignore] = IGNORE_COLOR
    return rgb


def write_figures(
    directory: str | os.PathLike,
    ev: Evaluation,
    pred: Any,
    truth: Any,
    *,
    image: Any = None,
    slices: list[int] | None = None,
) -> list[Path]:
    """PNG per chosen z slice (image / truth / prediction / error) and the per-slice mIoU plot.

    Only the chosen slices are read from the (lazy) volumes.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    nz = ev.shape[0]
    slices = default_slices(ev) if slices is None else list(slices)
    bad = [z for z in slices if not 0 <= z < nz]
    if bad:
        raise MagsegError(f"--slices {bad} outside the volume's z range 0..{nz - 1}")
    written = []
    table = ev.class_table
    # the display palette's legend (classes.DISPLAY_COLORS), then the error panel's marks
    legend = [Patch(facecolor=np.asarray(c) / 255, edgecolor="grey", label=n)
              for n, c in table.legend()]
    legend.append(Patch(facecolor=np.asarray(ERROR_COLOR) / 255, edgecolor="grey",
                        label="error (error panel)"))
    for z in slices:
        p = np.asarray(getattr(pred, "data", pred)[z])
        t = np.asarray(getattr(truth, "data", truth)[z])
        panels = []
        if image is not None:
            img = np.asarray(getattr(image, "data", image)[z], dtype=np.float32)
            lo, hi = np.nanpercentile(img, [1, 99]) if np.isfinite(img).any() else (0, 1)
            panels.append(("image", img, dict(cmap="gray", vmin=lo, vmax=hi)))
        panels += [
            ("truth", table.rgb(t, ev.ignore), {}),
            ("prediction", table.rgb(p, None), {}),
            ("error", _error_map(p, t, ev.ignore), {}),
        ]
        fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.6), squeeze=False)
        for ax, (title, data, kw) in zip(axes[0], panels, strict=True):
            ax.imshow(data, interpolation="nearest", **kw)
            ax.set_title(title)
            ax.set_axis_off()
        miou = ev.per_slice_miou[z]
        fig.suptitle(f"z = {z}   mIoU " + ("-" if np.isnan(miou) else f"{miou:.3f}"))
        fig.legend(handles=legend, loc="lower center", ncol=len(legend), fontsize="small")
        fig.tight_layout(rect=(0, 0.08, 1, 1))
        path = out / f"slice_z{z:05d}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)

    fig, ax = plt.subplots(figsize=(8, 3.2))
    ax.plot(np.arange(nz), ev.per_slice_miou, lw=1.2, label="per-slice mIoU")
    if not math.isnan(ev.scores["miou"]):
        ax.axhline(ev.scores["miou"], color="k", ls="--", lw=0.8, label="volume mIoU")
    ax.set_xlabel("z (slice)")
    ax.set_ylabel("mIoU")
    ax.set_ylim(0, 1.02)
    ax.set_xlim(0, max(nz - 1, 1))
    ax.legend(loc="lower right", fontsize="small")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = out / "per_slice_miou.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    written.append(path)
    return written


# --- one evaluation run (magseg-hpc evaluate, and a submitted evaluate job) -----------------


@dataclass(frozen=True)
class EvaluateSpec:
    """What one ``magseg-hpc evaluate`` run does, parsed once."""

    pred: str
    truth: str
    ignore: int | None = IGNORE_LABEL
    report: str | None = None
    figures: str | None = None
    slices: tuple[int, ...] | None = None
    pred_var: str = "labels"
    truth_var: str = "labels"
    image: str | None = None
    image_var: str | None = None
    allow_incomplete: bool = False
    command_line: str | None = None

    def resumed(self) -> EvaluateSpec:
        return self  # an evaluation simply runs again

    def check(self) -> None:
        """Every check that needs no computation (also run by submit before submitting)."""
        if self.slices and not self.figures:
            raise MagsegError("--slices chooses figure slices; add --figures DIR")
        inputs = [self.pred, self.truth, self.image]
        if self.report:
            check_no_overlap(self.report, inputs, replaces=False, flag="--report")
            check_output(self.report, kind="file", flag="--report")
            _check_replaceable_report(Path(self.report))
        if self.figures:
            check_no_overlap(self.figures, inputs, replaces=False, flag="--figures")
            check_output(self.figures, kind="dir", flag="--figures")
        if self.report and self.figures:
            check_no_overlap(self.report, [self.figures], replaces=False, flag="--report")
        if not self.allow_incomplete:
            for path in (self.pred, self.truth):
                if _incomplete(path):
                    raise MagsegError(
                        f"{path} is marked incomplete (its segment-volume run did not finish); "
                        "finish it with segment-volume --resume, or pass --allow-incomplete"
                    )


def _check_replaceable_report(report: Path) -> None:
    if not report.is_file():
        return
    try:
        fmt = json.loads(report.read_text()).get("format")
    except (OSError, ValueError, AttributeError):
        fmt = None
    if fmt != REPORT_FORMAT:
        raise MagsegError(
            f"--report {report} exists and is not a magseg-hpc evaluation report; "
            "choose another file name"
        )


def _incomplete(path) -> bool:
    """True for a label store this tool marked incomplete (segment-volume did not finish)."""
    p = volume_file(path)
    if tool_store_format(p) is None:
        return False
    meta = json.loads((p / "zarr.json").read_text())["attributes"]["magseg_hpc"]
    return meta.get("complete") is False


def _figure_image(spec: EvaluateSpec):
    if spec.image:
        return open_volume(spec.image, var=spec.image_var)
    try:
        return open_volume(spec.truth, var="image")
    except MagsegError:
        log.info("no image variable in %s; figures show labels only", spec.truth)
        return None


def run_evaluation(spec: EvaluateSpec) -> Evaluation:
    """Score, print the table, write the report and figures asked for."""
    spec.check()
    pred, truth, table = load_pair(spec.pred, spec.truth, pred_var=spec.pred_var,
                                   truth_var=spec.truth_var)
    image = None
    if spec.slices:
        bad = [z for z in spec.slices if not 0 <= z < truth.shape[0]]
        if bad:
            raise MagsegError(
                f"--slices {bad} outside the volume's z range 0..{truth.shape[0] - 1}")
    if spec.figures:
        image = _figure_image(spec)
        if image is not None and tuple(image.shape) != tuple(truth.shape):
            raise MagsegError(
                f"--image has shape {'x'.join(map(str, image.shape))} but the labels have "
                f"{'x'.join(map(str, truth.shape))}; pass the image the labels belong to"
            )
    with dask.config.set(scheduler="threads"), reading(f"{spec.pred} or {spec.truth}"):
        ev = evaluate_volumes(pred, truth, table, ignore=spec.ignore)
    print(format_table(ev), flush=True)
    if spec.report:
        write_report(spec.report, report_dict(ev, prediction=str(spec.pred),
                                              truth=str(spec.truth), pred_var=spec.pred_var,
                                              truth_var=spec.truth_var))
        print(f"report: {spec.report}")
    if spec.figures:
        slices = list(spec.slices) if spec.slices else None
        paths = write_figures(spec.figures, ev, pred, truth, image=image, slices=slices)
        print(f"figures: {len(paths)} PNGs in {spec.figures}")
    return ev
