"""magseg-hpc export-slices VOLUME DIR: chosen slices as 8-bit pictures to paint, and a manifest."""

from __future__ import annotations

import logging

from magseg_hpc.axes import AXES
from magseg_hpc.commands.common import add_support_options, int_list
from magseg_hpc.data.labelling import choose_indices, export_slices, read_slice_list
from magseg_hpc.data.masks import load_colors
from magseg_hpc.errors import MagsegError
from magseg_hpc.volume.io import open_volume
from magseg_hpc.volume.store import refuse_existing

log = logging.getLogger(__name__)


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "export-slices",
        help="write chosen slices as 8-bit PNG/TIFF pictures to paint in a labelling tool",
        description="Writes DIR/z00042.png ... (one intensity window for all, from percentiles "
        "inside the sample: a masked outside is left out and drawn black; signed data get a "
        "window symmetric about 0) and DIR/manifest.json (volume, shape, axis, indices, window, "
        "encoding, colour table to paint with).",
    )
    p.add_argument("volume", help="volume in any readable format")
    p.add_argument("out_dir", metavar="DIR", help="output folder (created)")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--n", type=int, help="N slices evenly spread along the axis")
    which.add_argument("--slices", type=int_list, metavar="N,N,...", help="these slice indices")
    which.add_argument("--suggestions", metavar="FILE",
                       help="a slice list, e.g. from `magseg-hpc suggest-slices`")
    p.add_argument("--axis", choices=AXES, default=None,
                   help="slice axis (default z, or the suggestions file's axis)")
    p.add_argument("--var", default=None, help="variable of a zarr group / HDF5 dataset")
    p.add_argument("--format", choices=("png", "tiff"), default="png", dest="fmt",
                   help="picture format, 8-bit either way (default png)")
    p.add_argument("--colors", "--colours", dest="colors", metavar="FILE", default=None,
                   help="colour table for the manifest (default: the standard class colours)")
    add_support_options(p)
    p.add_argument("--overwrite", action="store_true", help="replace an existing DIR")
    p.set_defaults(func=run)


def run(args) -> int:
    refuse_existing(args.out_dir, args.overwrite)
    axis, indices = args.axis, args.slices
    if args.suggestions:
        indices, list_axis = read_slice_list(args.suggestions)
        if axis and list_axis and axis != list_axis:
            raise MagsegError(f"{args.suggestions} lists {list_axis} slices but --axis is {axis}")
        axis = axis or list_axis
    axis = axis or "z"
    class_table = load_colors(args.colors) if args.colors else None
    if args.n is not None:
        size = int(open_volume(args.volume, var=args.var).sizes[axis])
        indices = choose_indices(size, n=args.n, axis=axis)
    manifest = export_slices(args.volume, args.out_dir, indices, axis=axis, var=args.var,
                             fmt=args.fmt, overwrite=args.overwrite, class_table=class_table,
                             outside=args.outside, mask=args.mask)
    w = manifest["window"]
    print(f"wrote {len(manifest['indices'])} {axis} slices to {args.out_dir} "
          f"({', '.join(map(str, manifest['indices']))}); window {w['low']:.4g}..{w['high']:.4g}"
          f" ({w['outside']}); paint with the colours in "
          f"{args.out_dir}/manifest.json")
    return 0
