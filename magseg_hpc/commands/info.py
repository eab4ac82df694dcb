"""magseg-hpc info PATH: describe a volume or a label store."""

from __future__ import annotations

import json

from magseg_hpc.commands.common import add_support_options
from magseg_hpc.volume.info import describe, format_info


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "info", help="shape, dtype, chunks, codec, sizes, coordinates, attributes, class counts",
    )
    p.add_argument("path", help="a volume in any readable format")
    p.add_argument("--var", default=None, help="variable of a zarr group / HDF5 dataset")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.add_argument("--no-counts", action="store_true", help="skip counting voxels per class")
    add_support_options(p)
    p.set_defaults(func=run)


def run(args) -> int:
    info = describe(args.path, var=args.var, count_classes=not args.no_counts,
                    outside=args.outside, mask=args.mask)
    print(json.dumps(info, indent=2, default=str) if args.json else format_info(info))
    return 0
