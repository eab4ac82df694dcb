"""magseg-hpc evaluate PRED TRUTH: per-class IoU/Dice, mIoU, confusion matrix, figures."""

from __future__ import annotations

import argparse
import logging

from magseg_hpc.classes import IGNORE_LABEL
from magseg_hpc.errors import MagsegError
from magseg_hpc.evaluate import (
    REPORT_FORMAT,
    evaluate_volumes,
    format_table,
    load_pair,
    report_dict,
    write_figures,
    write_report,
)
from magseg_hpc.outputs import check_no_overlap, check_output, tool_store_format
from magseg_hpc.paths import volume_file
from magseg_hpc.volume.io import open_volume, reading

log = logging.getLogger(__name__)


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values:
        raise argparse.ArgumentTypeError(f"expected slice indices like 10,64,120, got {text!r}")
    return values


def _ignore(text: str) -> int | None:
    if text.lower() == "none":
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected an integer label or 'none', got {text!r}"
        ) from None


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "evaluate",
        help="score a label volume against ground truth (IoU, Dice, mIoU, confusion, figures)",
        description=(
            "Compare a predicted label volume with ground truth chunk by chunk (Dask, threaded). "
            "Scores are dataset-level over the whole volume; classes absent from both truth "
            "and prediction are left out of mIoU."
        ),
    )
    p.add_argument("pred", help="predicted labels: a label store or any volume with labels")
    p.add_argument("truth", help="ground-truth labels (e.g. a phantom store)")
    p.add_argument(
        "--ignore",
        type=_ignore,
        default=IGNORE_LABEL,
        help=f"truth label left out of every score, or 'none' (default {IGNORE_LABEL})",
    )
    p.add_argument("--report", metavar="FILE.json", help="write the full report as JSON")
    p.add_argument("--figures", metavar="DIR", help="write slice and per-slice mIoU PNGs here")
    p.add_argument(
        "--slices",
        type=_int_list,
        metavar="N,N,...",
        help="z slices to draw (default: quartiles and the worst slice)",
    )
    p.add_argument("--pred-var", default="labels",
                   help="variable in PRED (default labels, or its only array)")
    p.add_argument("--truth-var", default="labels",
                   help="variable in TRUTH (default labels, or its only array)")
    p.add_argument(
        "--image",
        metavar="PATH",
        help="intensity volume for the figures (default: TRUTH's 'image' variable if it has one)",
    )
    p.add_argument(
        "--image-var",
        default=None,
        help="variable in --image (default image)",
    )
    p.add_argument("--allow-incomplete", action="store_true",
                   help="score a label store marked incomplete (an interrupted segment-volume)")
    p.set_defaults(func=run, check=check_args)


def _incomplete(path) -> bool:
    """True for a label store this tool marked incomplete (segment-volume did not finish)."""
    import json

    p = volume_file(path)
    if tool_store_format(p) is None:
        return False
    meta = json.loads((p / "zarr.json").read_text())["attributes"]["magseg_hpc"]
    return meta.get("complete") is False


def check_args(args) -> None:
    """Every check of the arguments that needs no computation (also run by submit)."""
    import json
    from pathlib import Path

    if args.slices and not args.figures:
        raise MagsegError("--slices chooses figure slices; add --figures DIR")
    inputs = [args.pred, args.truth, args.image]
    if args.report:
        check_no_overlap(args.report, inputs, replaces=False, flag="--report")
        check_output(args.report, kind="file", flag="--report")
        report = Path(args.report)
        if report.is_file():
            try:
                fmt = json.loads(report.read_text()).get("format")
            except (OSError, ValueError, AttributeError):
                fmt = None
            if fmt != REPORT_FORMAT:
                raise MagsegError(
                    f"--report {args.report} exists and is not a magseg-hpc evaluation report; "
                    "choose another file name"
                )
    if args.figures:
        check_no_overlap(args.figures, inputs, replaces=False, flag="--figures")
        check_output(args.figures, kind="dir", flag="--figures")
    if args.report and args.figures:
        check_no_overlap(args.report, [args.figures], replaces=False, flag="--report")
    if not args.allow_incomplete:
        for path in (args.pred, args.truth):
            if _incomplete(path):
                raise MagsegError(
                    f"{path} is marked incomplete (its segment-volume run did not finish); "
                    "finish it with segment-volume --resume, or pass --allow-incomplete"
                )


def _figure_image(args):
    if args.image:
        return open_volume(args.image, var=args.image_var)
    try:
        return open_volume(args.truth, var="image")
    except MagsegError:
        log.info("no image variable in %s; figures show labels only", args.truth)
        return None


def run(args) -> int:
    import dask

    check_args(args)
    pred, truth, table = load_pair(
        args.pred, args.truth, pred_var=args.pred_var, truth_var=args.truth_var
    )
    image = None
    if args.slices:
        bad = [z for z in args.slices if not 0 <= z < truth.shape[0]]
        if bad:
            raise MagsegError(
                f"--slices {bad} outside the volume's z range 0..{truth.shape[0] - 1}")
    if args.figures:
        image = _figure_image(args)
        if image is not None and tuple(image.shape) != tuple(truth.shape):
            raise MagsegError(
                f"--image has shape {'x'.join(map(str, image.shape))} but the labels have "
                f"{'x'.join(map(str, truth.shape))}; pass the image the labels belong to"
            )
    with dask.config.set(scheduler="threads"), reading(f"{args.pred} or {args.truth}"):
        ev = evaluate_volumes(pred, truth, table, ignore=args.ignore)
    print(format_table(ev))
    if args.report:
        write_report(
            args.report,
            report_dict(
                ev,
                prediction=str(args.pred),
                truth=str(args.truth),
                pred_var=args.pred_var,
                truth_var=args.truth_var,
            ),
        )
        print(f"report: {args.report}")
    if args.figures:
        paths = write_figures(args.figures, ev, pred, truth, image=image, slices=args.slices)
        print(f"figures: {len(paths)} PNGs in {args.figures}")
    return 0
