"""magseg-hpc import-masks MASKS OUT.zarr --colors FILE: hand labels to a label store.

MASKS is a folder of colour PNG masks (one per z slice in name order; or, with ``--like
VOLUME``, masks of any subset of slices matched by the index in their names), or a label
array as labelling tools save it (zarr, TIFF, NPY, HDF5; ``--unlabelled-value`` says which
value means "not labelled").
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from magseg_hpc.axes import AXES
from magseg_hpc.classes import ClassTable
from magseg_hpc.data.labelling import import_label_volume, import_sparse_masks, index_from_name
from magseg_hpc.data.masks import import_masks, load_colors
from magseg_hpc.errors import MagsegError
from magseg_hpc.outputs import check_no_overlap
from magseg_hpc.paths import volume_file
from magseg_hpc.volume.io import ZARR_MARKERS
from magseg_hpc.volume.store import LABEL_FORMAT, refuse_existing

log = logging.getLogger(__name__)


def _values(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers like 3,1,2, got {text!r}") from None


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "import-masks",
        help="turn colour PNG masks (all slices, or some with --like) or a label array into "
        "a label store",
        description="A folder of *.png: colours map to classes through --colors (any other "
        "colour becomes 255, ignore, and is counted). Without --like each PNG is one z slice in "
        "name order; with --like VOLUME masks may cover any subset of slices, matched by the "
        "index in the file name (z00042.png), and slices without a mask are 255. MASKS may "
        "also be a label array (zarr, TIFF, NPY, HDF5): --unlabelled-value maps its "
        "unlabelled value (e.g. napari's 0) to 255.",
    )
    p.add_argument("masks_dir", metavar="MASKS", help="folder of colour PNG masks, or a label "
                   "array (zarr, .tif, .npy, file.h5:/dataset)")
    p.add_argument("out", help="output label store (zarr)")
    p.add_argument("--colors", "--colours", dest="colors", metavar="FILE", default=None,
                   help='YAML/JSON colour table in class order, e.g. {"background": [149, 0, 255], '
                   '"domain_minus": [30, 0, 255], "domain_plus": [255, 0, 0]}, or the '
                   "manifest.json of export-slices (required for PNG masks)")
    p.add_argument("--like", metavar="VOLUME", default=None,
                   help="the volume the masks label: its shape, axis and coordinates (sparse)")
    p.add_argument("--var", default=None, help="variable of --like (zarr group / HDF5)")
    p.add_argument("--axis", choices=AXES, default=None,
                   help="axis of the mask slices (default: from the file names, else z)")
    p.add_argument("--unlabelled-value", "--unlabeled-value", dest="unlabelled_value", type=int,
                   default=None, metavar="V", help="label arrays: the value meaning unlabelled")
    p.add_argument("--class-values", type=_values, default=None, metavar="V0,V1,...",
                   help="label arrays: the value of each class in class order (default 0,1,2)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    p.set_defaults(func=run)


def _is_png_folder(path: Path) -> bool:
    if not path.is_dir() or any((path / m).exists() for m in ZARR_MARKERS):
        return False
    return any(f.suffix.lower() == ".png" for f in path.iterdir()) or not any(
        f.suffix.lower() in (".tif", ".tiff") for f in path.iterdir())


def _warn_if_sparse(folder: Path) -> None:
    """Masks named by slice index (z00042.png) but not 0..N-1 were probably meant sparse."""
    try:
        names = sorted(f for f in folder.iterdir() if f.suffix.lower() == ".png")
        indices = [index_from_name(f)[1] for f in names]
    except (OSError, MagsegError):
        return
    if indices and sorted(indices) != list(range(len(indices))):
        log.warning("%s: the mask names carry slice indices (%s ...) but are imported as z "
                    "slices 0..%d in name order; pass --like VOLUME to import them as those "
                    "slices", folder, ", ".join(map(str, sorted(indices)[:4])), len(indices) - 1)


def run(args) -> int:
    check_no_overlap(args.out, [p for p in (args.masks_dir, args.colors, args.like) if p])
    refuse_existing(args.out, args.overwrite, LABEL_FORMAT)
    src = Path(args.masks_dir)
    if _is_png_folder(src) or not volume_file(args.masks_dir).exists():
        if args.unlabelled_value is not None or args.class_values is not None:
            raise MagsegError("--unlabelled-value and --class-values apply to label arrays; "
                              "colour masks map colours through --colors")
        if not args.colors:
            raise MagsegError("colour PNG masks need --colors FILE (a colour table, or the "
                              "manifest.json written by export-slices)")
        class_table = load_colors(args.colors)
        if args.like:
            result = import_sparse_masks(args.masks_dir, args.out, class_table, args.like,
                                         axis=args.axis, var=args.var, overwrite=args.overwrite)
        else:
            if args.axis not in (None, "z"):
                raise MagsegError("--axis needs --like VOLUME (masks matched by slice index)")
            _warn_if_sparse(src)
            result = import_masks(args.masks_dir, args.out, class_table,
                                  overwrite=args.overwrite)
    else:
        class_table = load_colors(args.colors) if args.colors else ClassTable.default()
        result = import_label_volume(
            args.masks_dir, args.out, class_table, like=args.like, axis=args.axis or "z",
            unlabelled_value=args.unlabelled_value, class_values=args.class_values,
            overwrite=args.overwrite,
        )
    counts = ", ".join(f"{name} {n}" for name, n in result.counts.items())
    print(f"wrote {args.out}: labels {'x'.join(map(str, result.shape))} ({counts}; "
          f"ignore/unknown {result.unknown})")
    if result.labelled is not None:
        n = result.shape["zyx".index(result.axis)]
        print(f"labelled {result.axis} slices ({len(result.labelled)} of {n}): "
              f"{', '.join(map(str, result.labelled)) or 'none'}")
    return 0
