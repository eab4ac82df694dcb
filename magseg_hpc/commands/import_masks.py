"""magseg-hpc import-masks MASKS_DIR OUT.zarr --colors FILE: colour PNG masks to labels."""

from __future__ import annotations

import logging

from magseg_hpc.data.masks import import_masks, load_colors
from magseg_hpc.volume.store import LABEL_FORMAT, refuse_existing

log = logging.getLogger(__name__)


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "import-masks",
        help="turn a folder of colour PNG masks (one per z slice) into a label store",
        description="Each *.png in MASKS_DIR (sorted by name) is one z slice. Colours map to "
        "classes through --colors; any other colour becomes 255 (ignore) and is counted.",
    )
    p.add_argument("masks_dir", help="folder of colour PNG masks, one per z slice")
    p.add_argument("out", help="output label store (zarr)")
    p.add_argument("--colors", "--colours", dest="colors", required=True, metavar="FILE",
                   help='YAML/JSON colour table in class order, e.g. {"background": [149, 0, 255], '
                   '"domain_minus": [30, 0, 255], "domain_plus": [255, 0, 0]}')
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    p.set_defaults(func=run)


def run(args) -> int:
    from magseg_hpc.outputs import check_no_overlap

    check_no_overlap(args.out, [args.masks_dir, args.colors])
    refuse_existing(args.out, args.overwrite, LABEL_FORMAT)
    class_table = load_colors(args.colors)
    result = import_masks(args.masks_dir, args.out, class_table, overwrite=args.overwrite)
    counts = ", ".join(f"{name} {n}" for name, n in result.counts.items())
    log.info(
        "wrote %s: labels %s (%s; ignore %d)",
        args.out, "x".join(map(str, result.shape)), counts, result.unknown,
    )
    return 0
