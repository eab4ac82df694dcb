"""magseg-hpc evaluate PRED TRUTH: per-class IoU/Dice, mIoU, confusion matrix, figures."""

from __future__ import annotations

import argparse

from magseg_hpc.classes import IGNORE_LABEL
from magseg_hpc.commands.common import int_list
from magseg_hpc.evaluate import EvaluateSpec, run_evaluation


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
        type=int_list,
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
    p.set_defaults(func=run, check=check_args, job_spec=job_spec)


def job_spec(args) -> EvaluateSpec:
    """The evaluation the arguments ask for, parsed once (also what ``submit evaluate``
    carries)."""
    return EvaluateSpec(
        pred=args.pred, truth=args.truth, ignore=args.ignore, report=args.report,
        figures=args.figures, slices=tuple(args.slices) if args.slices else None,
        pred_var=args.pred_var, truth_var=args.truth_var, image=args.image,
        image_var=args.image_var, allow_incomplete=args.allow_incomplete,
        command_line=args.command_line,
    )


def check_args(args) -> None:
    """Every check of the arguments that needs no computation (also run by submit)."""
    job_spec(args).check()


def run(args) -> int:
    run_evaluation(job_spec(args))
    return 0
