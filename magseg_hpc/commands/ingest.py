"""magseg-hpc ingest SRC OUT.zarr: convert a volume to a compressed zarr store."""

from __future__ import annotations

import sys

from tqdm import tqdm

from magseg_hpc.commands.common import add_support_options, int_triple
from magseg_hpc.outputs import check_no_overlap
from magseg_hpc.volume.ingest import ingest
from magseg_hpc.volume.io import ALLOW_ABSENT_FLAG, open_volume
from magseg_hpc.volume.store import CODECS, IMAGE_FORMAT, refuse_existing
from magseg_hpc.volume.support import describe


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "ingest", help="convert a TIFF/HDF5/NPY/GIF/PNG/zarr volume to a compressed zarr store",
        description="Stream a volume into a zarr store with an `image` variable (dims z, y, x).",
    )
    p.add_argument("src", help="volume: zarr, .tif/.tiff or folder, file.h5:/dataset, .npy, "
                   ".gif, PNG folder")
    p.add_argument("out", help="output zarr store")
    p.add_argument("--chunks", type=int_triple, default=None, metavar="Z,Y,X",
                   help="output chunks (default 32,256,256 clipped to the shape)")
    p.add_argument("--dataset", "--var", dest="var", default=None,
                   help="variable of a zarr group or dataset of an HDF5 file")
    p.add_argument("--codec", default="zstd", choices=list(CODECS),
                   help="compression (default zstd)")
    p.add_argument("--fill-nonfinite", type=float, default=None, metavar="VALUE",
                   help="replace NaN/inf voxels with VALUE instead of refusing the volume")
    add_support_options(p)
    p.add_argument(ALLOW_ABSENT_FLAG, action="store_true",
                   help="read the chunks of a zarr input that have no file as its fill value "
                   "(a writer that skips empty chunks); default: refuse them as lost files")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    p.set_defaults(func=run)


def run(args) -> int:
    check_no_overlap(args.out, [args.src, args.mask])
    refuse_existing(args.out, args.overwrite, IMAGE_FORMAT)
    total = open_volume(args.src, var=args.var).shape[0]
    with tqdm(total=total, unit="slice", desc="ingest", file=sys.stderr,
              disable=not sys.stderr.isatty()) as bar:
        summary = ingest(
            args.src, args.out, chunks=args.chunks, var=args.var, codec_name=args.codec,
            fill_nonfinite=args.fill_nonfinite, overwrite=args.overwrite, progress=bar.update,
            outside=args.outside, mask=args.mask,
            absent_chunks_are_fill=args.absent_chunks_are_fill,
        )
    shape = "x".join(map(str, summary["shape"]))
    print(f"wrote {args.out}: image {shape} {summary['dtype']}, chunks "
          f"{','.join(map(str, summary['chunks']))}, codec {args.codec}; "
          f"{describe(summary['support'])}")
    return 0
