"""magseg-hpc suggest-slices VOLUME --model CKPT --n N: which slices to label next."""

from __future__ import annotations

import logging
from pathlib import Path

from magseg_hpc.axes import AXES
from magseg_hpc.commands.common import add_support_options
from magseg_hpc.data.labelling import write_slice_list
from magseg_hpc.errors import MagsegError
from magseg_hpc.launch.dask_cluster import DEFAULT_DASHBOARD, open_cluster
from magseg_hpc.precision import PRECISIONS
from magseg_hpc.segment.pipeline import SegmentOptions
from magseg_hpc.segment.suggest import plan_suggestions, suggest_slices
from magseg_hpc.volume.store import refuse_existing

log = logging.getLogger(__name__)


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "suggest-slices",
        help="rank slices by the model's uncertainty inside the sample; write a slice list",
        description="Streams VOLUME through the model like segment-volume (Dask, bounded "
        "memory; a scratch store of probabilities next to the output is deleted at the end), "
        "scores each slice by the mean uncertainty over its predicted sample pixels and picks "
        "N, spread along the axis. The list (best first, with scores) is what "
        "`export-slices --suggestions` reads.",
    )
    p.add_argument("volume", help="volume in any readable format")
    p.add_argument("--model", required=True, metavar="CKPT", help="checkpoint from train")
    p.add_argument("--n", type=int, required=True, help="slices to suggest")
    p.add_argument("--axis", choices=AXES, default="z", help="slice axis (default z)")
    p.add_argument("-o", "--output", default="suggestions.txt", metavar="FILE",
                   help="slice list to write (default suggestions.txt)")
    p.add_argument("--labels", metavar="LABELS", default=None,
                   help="labels so far: their labelled slices are not suggested and keep "
                   "suggestions at a distance")
    p.add_argument("--score", choices=("entropy", "margin"), default="entropy",
                   help="uncertainty: normalised entropy (default) or 1 - top-2 margin")
    p.add_argument("--min-gap", type=int, default=None, metavar="K",
                   help="slices between picks (default: axis length / (2 x all labelled))")
    p.add_argument("--var", default=None, help="variable of a zarr group / HDF5 dataset")
    add_support_options(p)
    p.add_argument("--batch-size", type=int, default=8, help="slices per forward (default 8)")
    p.add_argument("--device", default="auto", help="auto (default), cpu, cuda or cuda:N")
    p.add_argument("--precision", choices=PRECISIONS, default="auto",
                   help="the forward's numbers, as segment-volume (default auto: bf16 where "
                   "native, else fp32)")
    g = p.add_argument_group("cluster (as segment-volume; default: a local cluster)")
    g.add_argument("--workers", type=int, default=None, help="local Dask workers")
    g.add_argument("--threads-per-worker", type=int, default=None,
                   help="torch threads per worker")
    g.add_argument("--scheduler", metavar="ADDRESS", default=None,
                   help="join an existing Dask scheduler (tcp://HOST:PORT)")
    g.add_argument("--dashboard-address", default=DEFAULT_DASHBOARD,
                   help=f"Dask dashboard HOST:PORT (default {DEFAULT_DASHBOARD})")
    g.add_argument("--in-process", action="store_true",
                   help="run local workers as threads of this process")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output list")
    p.set_defaults(func=run)


def run(args) -> int:
    out = Path(args.output)
    refuse_existing(out, args.overwrite)
    if out.is_dir():
        raise MagsegError(f"{out}: is a folder; give a file name for the slice list")
    opts = SegmentOptions(
        input=args.volume, output="", model=args.model, var=args.var, axes=(args.axis,),
        outside=args.outside, mask=args.mask, batch_size=args.batch_size,
        device=args.device, precision=args.precision, command_line=args.command_line,
    )
    # Every check that can fail on bad input runs before any cluster or output exists.
    plan = plan_suggestions(opts, n=args.n, score=args.score, labels=args.labels,
                            min_gap=args.min_gap, scratch_dir=out.resolve().parent)
    with open_cluster(scheduler=args.scheduler, workers=args.workers,
                      threads_per_worker=args.threads_per_worker, device=args.device,
                      dashboard_address=args.dashboard_address,
                      processes=not args.in_process) as handle:
        handle.announce()
        result = suggest_slices(plan, handle.client, torch_threads=handle.torch_threads)
    header = (f"magseg-hpc suggest-slices: {args.n} slices to label next, best first\n"
              f"volume: {args.volume}\nmodel: {args.model}\nscore: mean {args.score} over "
              f"predicted sample pixels; min gap {result.min_gap}")
    write_slice_list(out, result.indices, axis=result.axis, scores=result.scores, header=header)
    print(f"wrote {out}: {result.axis} slices {', '.join(map(str, result.indices))}")
    return 0
