"""magseg-hpc preview PATH -o FILE.png: a slice of a volume, optionally with labels."""

from __future__ import annotations

import logging

from magseg_hpc.axes import AXES
from magseg_hpc.errors import MagsegError
from magseg_hpc.outputs import check_no_overlap, check_output
from magseg_hpc.volume.preview import render_preview

log = logging.getLogger(__name__)


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "preview",
        help="render one slice of a volume to PNG, with labels overlaid in class colours",
        description="Default: the middle z slice. Intensities in grey, clipped to the 1st and "
        "99.5th percentiles of the slice. An existing PNG is replaced.",
    )
    p.add_argument("path", help="a volume in any readable format")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--z", type=int, default=None, metavar="N", help="z index of the slice")
    where.add_argument("--y", type=int, default=None, metavar="N", help="y index of the slice")
    where.add_argument("--x", type=int, default=None, metavar="N", help="x index of the slice")
    p.add_argument("--var", default=None, help="variable of a zarr group / HDF5 dataset")
    p.add_argument("--labels", default=None, metavar="LABELS.zarr",
                   help="label store to overlay (may be PATH itself, e.g. a phantom)")
    p.add_argument("--alpha", type=float, default=0.4, help="label opacity (default %(default)s)")
    p.add_argument("-o", "--output", required=True, metavar="FILE.png", help="output picture")
    p.set_defaults(func=run)


def run(args) -> int:
    if not 0 <= args.alpha <= 1:
        raise MagsegError(f"--alpha {args.alpha}: must be in [0, 1]")
    check_no_overlap(args.output, [args.path, args.labels], replaces=False, flag="-o")
    check_output(args.output, kind="file", flag="-o")
    axis, index = "z", None
    for name in AXES:
        if getattr(args, name) is not None:
            axis, index = name, getattr(args, name)
    summary = render_preview(
        args.path, args.output, axis=axis, index=index, var=args.var, labels=args.labels,
        alpha=args.alpha,
    )
    log.info("wrote %s (%s = %d)", summary["path"], summary["axis"], summary["index"])
    return 0
