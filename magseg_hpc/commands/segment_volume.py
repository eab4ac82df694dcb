"""magseg-hpc segment-volume IN OUT --model CKPT: segment a 3D volume on a Dask cluster."""

from __future__ import annotations

import logging
import re

from magseg_hpc.commands.common import add_support_options
from magseg_hpc.errors import MagsegError
from magseg_hpc.launch.dask_cluster import DEFAULT_DASHBOARD
from magseg_hpc.launch.jobs import SMALL_VOLUME_BYTES, ClusterOptions, SegmentSpec
from magseg_hpc.launch.resources import resolve_cluster
from magseg_hpc.precision import PRECISIONS
from magseg_hpc.segment.pipeline import SegmentOptions, run_segment_volume

log = logging.getLogger(__name__)


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "segment-volume",
        help="segment a 3D volume slice by slice on a Dask cluster into a labelled zarr store",
        description="Stream IN through a trained model slab by slab on a Dask cluster and "
        "write OUT, a labelled zarr store (labels, optional probabilities, class table, "
        "provenance, OME-Zarr label metadata). Finished slabs are recorded: --resume continues "
        "an interrupted run.",
    )
    p.add_argument("input", metavar="IN", help="input volume (zarr, TIFF, HDF5, NPY, ...)")
    p.add_argument("output", metavar="OUT", help="output label store (zarr directory)")
    p.add_argument("--model", metavar="CKPT", help="checkpoint written by `magseg-hpc train`")
    p.add_argument("--method", choices=("model", "threshold"), default="model",
                   help="model (default) or the classical threshold baseline (no checkpoint)")
    p.add_argument("--var", default=None, help="variable of a zarr group / HDF5 dataset")
    p.add_argument("--axes", default="auto",
                   help="slice along these axes: z, or z,y,x to fuse three planes; auto "
                   "(default): the planes the model was trained on (data.axes), z for the "
                   "threshold baseline")
    p.add_argument("--batch-size", type=int, default=8, help="slices per forward (default 8)")
    p.add_argument("--slab-size", type=int, default=16,
                   help="slices per task, rounded up to whole output chunks (default 16)")
    p.add_argument("--probabilities", action="store_true",
                   help="also store per-class probabilities (uint8, p x 255)")
    p.add_argument("--tta", action="store_true",
                   help="average horizontal, vertical and both flips (4x the compute)")
    p.add_argument("--normalization", choices=("input", "checkpoint"), default="input",
                   help="intensity statistics: fitted on IN the way training fitted them "
                   "(default; robust to another intensity scale, e.g. 8-bit vs float) or the "
                   "training volume's, stored in the checkpoint")
    add_support_options(p)
    p.add_argument("--device", default="auto", help="auto (default), cpu, cuda or cuda:N")
    p.add_argument("--precision", choices=PRECISIONS, default="auto",
                   help="the forward's numbers: auto (default) takes bf16 where the CPU "
                   "(AVX512_BF16/AMX) or GPU computes it natively, ~2x faster, labels within "
                   "0.002 mIoU of fp32; else fp32")
    p.add_argument("--bf16", dest="precision", action="store_const", const="bf16",
                   help="same as --precision bf16")
    g = p.add_argument_group("cluster (default: a local cluster sized for this machine)")
    g.add_argument("--workers", type=int, default=None,
                   help="local Dask workers (default: one per GPU, else cores // threads)")
    g.add_argument("--threads-per-worker", type=int, default=None,
                   help="torch threads per worker (default min(cores, 4); cores/GPUs on GPU)")
    g.add_argument("--scheduler", metavar="ADDRESS", default=None,
                   help="join an existing Dask scheduler (tcp://HOST:PORT)")
    g.add_argument("--cluster", choices=("slurm",), default=None,
                   help="start Dask workers as SLURM jobs (needs --job)")
    g.add_argument("--job", metavar="PROFILE", default=None,
                   help="job profile YAML for --cluster slurm (e.g. jobs/cluster_2gpu.yaml)")
    g.add_argument("--jobs", type=int, default=1, help="SLURM jobs to start (default 1)")
    g.add_argument("--dashboard-address", default=DEFAULT_DASHBOARD,
                   help=f"Dask dashboard HOST:PORT (default {DEFAULT_DASHBOARD}; :0 picks a port)")
    g.add_argument("--in-process", action="store_true",
                   help="run the local worker as threads of this process (the default for a "
                   f"volume of up to {SMALL_VOLUME_BYTES // 2**20} MiB on one local worker)")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted run of the same model and options")
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUT")
    p.set_defaults(func=run, check=check_args, job_spec=job_spec)


def check_dashboard_address(text: str) -> None:
    """HOST:PORT, :PORT or PORT, with a port in 0..65535 (0 picks a free one)."""
    host, sep, port = str(text).rpartition(":")
    if not sep:
        host, port = "", str(text)
    host_ok = host == "" or re.fullmatch(r"[A-Za-z0-9._-]+|\[[0-9A-Fa-f:.]+\]", host)
    if not (host_ok and port.isdigit() and int(port) <= 65535):
        raise MagsegError(
            f"--dashboard-address {text!r}: expected HOST:PORT with a port in 0..65535 "
            f"(e.g. {DEFAULT_DASHBOARD}, or 127.0.0.1:0 for any free port)"
        )


def check_cluster_args(args) -> None:
    """The cluster flags: what argparse cannot say about them."""
    for flag, value in (("--workers", args.workers),
                        ("--threads-per-worker", args.threads_per_worker),
                        ("--jobs", args.jobs)):
        if value is not None and value < 1:
            raise MagsegError(f"{flag} {value}: must be a positive integer (>= 1)")
    if args.scheduler and args.cluster:
        raise MagsegError("--scheduler and --cluster exclude each other; pick one")
    if args.cluster == "slurm" and not args.job:
        raise MagsegError("--cluster slurm needs --job jobs/PROFILE.yaml (partition, cpus...)")
    check_dashboard_address(args.dashboard_address)


def check_args(args) -> None:
    """Every check of the arguments that needs no reading of data (run by submit before it
    submits): the cluster flags, then the run's options (``SegmentOptions.check``)."""
    check_cluster_args(args)
    job_spec(args).options.check()


def job_spec(args) -> SegmentSpec:
    """The run the arguments ask for, parsed once (also what ``submit segment`` carries)."""
    return SegmentSpec(
        SegmentOptions(
            input=args.input, output=args.output, model=args.model, var=args.var,
            axes=args.axes, batch_size=args.batch_size, probabilities=args.probabilities,
            tta=args.tta, device=args.device, slab_size=args.slab_size, resume=args.resume,
            overwrite=args.overwrite, method=args.method, normalization=args.normalization,
            precision=args.precision, command_line=args.command_line,
            outside=args.outside, mask=args.mask,
        ),
        ClusterOptions(
            scheduler=args.scheduler, cluster=args.cluster, job=args.job, jobs=args.jobs,
            workers=args.workers, threads_per_worker=args.threads_per_worker,
            dashboard_address=args.dashboard_address, in_process=args.in_process,
        ),
    )


def run(args) -> int:
    check_cluster_args(args)  # the options' own checks are prepare's first step
    if args.cluster == "slurm":  # submit's check: sbatch and srun here, before anything starts
        resolve_cluster("slurm")
    spec = job_spec(args)
    print(run_segment_volume(spec.options, spec.cluster_for).format())
    return 0
