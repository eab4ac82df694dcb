"""What runs inside a Dask worker: per-worker caches and the slab tasks.

Tasks receive a ``SlabJob`` (paths, checksum and options: plain data, a few hundred bytes) and
a ``Slab``; never a model or an array. Each worker process loads the model once, on first use,
from the checkpoint path, after checking the file's sha256 against the one the client computed
(so a checkpoint replaced mid-run is refused instead of silently mixing models). Each task
opens the input by path, reads only its slab, runs the kernel and writes whole output chunks.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from magseg_hpc.axes import AXES
from magseg_hpc.cpus import available_cores
from magseg_hpc.errors import MagsegError
from magseg_hpc.models.checkpoint import checkpoint_sha256, load_inference_model
from magseg_hpc.paths import volume_file
from magseg_hpc.precision import autocast, resolve_precision
from magseg_hpc.segment.blocks import Slab
from magseg_hpc.segment.kernel import fuse_probabilities, segment_slab, support_outside
from magseg_hpc.segment.threshold import apply_threshold, threshold_halo
from magseg_hpc.volume.store import write_label_region
from magseg_hpc.volume.support import inside_pixels, is_masked, open_input, support_of

log = logging.getLogger(__name__)

SCRATCH = "scratch.zarr"  # per-axis probabilities of an orthoplane run, under OUT/.magseg/


@dataclass(frozen=True)
class SlabJob:
    """Everything a slab task needs, as plain values (cheap to ship, safe to pickle)."""

    input: str
    var: str | None
    output: str
    axes: tuple[str, ...]
    num_classes: int
    method: str = "model"  # "model" or "threshold"
    model: str | None = None
    model_sha256: str | None = None
    threshold: dict = field(default_factory=dict)
    batch_size: int = 8
    tta: bool = False
    probabilities: bool = False
    device: str = "auto"
    torch_threads: int | None = None
    normalization: dict | None = None  # None: the checkpoint's
    context: int = 1  # model.context_slices: halo slices read = context // 2 on each side
    # auto, fp32 or bf16 (magseg_hpc.precision); auto is resolved here, on the worker's device
    precision: str = "fp32"
    mask: str | None = None  # a mask file folded into the input as a NaN outside

    @property
    def scratch(self) -> str:
        return str(Path(self.output) / ".magseg" / SCRATCH)

    @property
    def support(self) -> dict:
        """The input's support decision, as the normalisation or the baseline carries it."""
        return support_of(self.threshold if self.method == "threshold" else self.normalization)


_LOCK = threading.Lock()
_MODELS: dict[tuple[str, str, str], tuple] = {}
_VOLUMES: dict[tuple[str, str | None, str | None], object] = {}


def worker_name() -> str:
    try:
        from distributed import get_worker

        return str(get_worker().name)
    except (ImportError, ValueError):
        return f"pid{os.getpid()}"


def resolve_device(device: str) -> str:
    """Pick this worker's torch device. Runs in the worker: the client never touches CUDA.

    With several GPUs on one machine, the worker whose name ends in ``i`` takes GPU ``i % n``.
    """
    import torch

    if device == "cpu":
        return "cpu"
    if not torch.cuda.is_available():
        if device.startswith("cuda"):
            raise MagsegError(f"--device {device} asked for, but this worker has no CUDA GPU")
        return "cpu"
    if ":" in device:
        return device
    # LocalCluster names workers 0, 1, ...; dask-jobqueue JOB-0, JOB-1 with several per job.
    digits = re.search(r"(\d+)$", worker_name())
    index = int(digits.group(1)) % torch.cuda.device_count() if digits else 0
    return f"cuda:{index}"


def get_model(path: str, sha256: str, device: str):
    """The (model, checkpoint) for ``path`` on ``device``, loaded once per worker process."""
    key = (path, sha256, device)
    with _LOCK:
        if key not in _MODELS:
            actual = checkpoint_sha256(path)
            if actual != sha256:
                raise MagsegError(
                    f"{path}: checkpoint changed during the run (sha256 {actual[:12]}, expected "
                    f"{sha256[:12]}); restore it or start again with --overwrite"
                )
            # One model per worker: a long-lived cluster moving to another model frees the old.
            for other in [k for k in _MODELS if k[2] == device]:
                del _MODELS[other]
            log.info("worker %s: loading %s on %s", worker_name(), path, device)
            _MODELS[key] = load_inference_model(path, device=device)
        return _MODELS[key]


def get_volume(path: str, var: str | None, mask: str | None = None):
    """The input DataArray, opened once per worker (metadata only; reads are per slab)."""
    key = (path, var, mask)
    with _LOCK:
        if key not in _VOLUMES:
            _VOLUMES[key] = open_input(path, var, mask)
        return _VOLUMES[key]


def read_slab(job: SlabJob, slab: Slab, halo: int = 0) -> tuple[np.ndarray, int]:
    """The slab's voxels (z, y, x order) plus ``halo`` slices of context along its axis
    (clipped at the volume's faces), checked finite. Returns (data, slices of halo before)."""
    volume = get_volume(job.input, job.var, job.mask)
    region = list(slab.region(tuple(volume.shape)))
    axis = AXES.index(slab.axis)
    lo = max(0, slab.start - halo)
    region[axis] = slice(lo, min(volume.shape[axis], slab.stop + halo))
    # The synchronous scheduler reads the overlapping chunks in this task, not as new tasks.
    data = np.asarray(volume.data[tuple(region)].compute(scheduler="synchronous"))
    if not volume_file(job.input).exists():  # zarr reads a vanished store as its fill value
        raise MagsegError(f"{job.input}: the input vanished during the run (at slab "
                          f"{slab.name}); restore it and run again with --resume")
    # NaN is the outside of a NaN-masked input; any other non-finite voxel is an error
    finite = np.isfinite(data) | ~inside_pixels(data, job.support)
    if data.dtype.kind == "f" and not finite.all():
        raise MagsegError(
            f"{job.input}: {int((~finite).sum())} NaN or inf voxels in slab {slab.name}; "
            "replace them first (magseg-hpc ingest IN FIXED.zarr --fill-nonfinite 0) or, if "
            "NaN marks the outside, pass --outside nan"
        )
    return data, slab.start - lo


def _set_threads(job: SlabJob) -> None:
    """Torch intra-op threads: as told, else this process's CPUs shared by its Dask threads
    (Dask nannies start workers with OMP_NUM_THREADS=1, which would leave torch on 1)."""
    import torch

    threads = job.torch_threads
    if not threads:
        try:
            from distributed import get_worker

            per_task = get_worker().state.nthreads
        except (ImportError, ValueError, AttributeError):
            per_task = 1
        threads = max(1, available_cores() // max(1, per_task))
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


def run_slab(job: SlabJob, slab: Slab, *waited_for: dict) -> dict:
    """One task: read, segment (or fuse), write. Returns timings for the run summary.
    ``waited_for``: the results of the slabs this one reads (a fusion slab's passes), passed
    only so that Dask runs it after them."""
    t0 = time.perf_counter()
    if slab.stage == "fuse":
        return _run_fuse(job, slab, t0)
    _set_threads(job)
    if job.method == "threshold":
        # The threshold's smoothing is 3D: read context slices so slabs match the whole volume.
        data, before = read_slab(job, slab, threshold_halo(job.threshold))
        t_read = time.perf_counter()
        labels = np.asarray(apply_threshold(data, job.threshold), np.uint8)
        labels, probs, precision = labels[before:before + slab.num_slices()], None, None
        data = data[before:before + slab.num_slices()]
    else:
        data, before = read_slab(job, slab, job.context // 2)
        t_read = time.perf_counter()
        device = resolve_device(job.device)
        precision = resolve_precision(job.precision, device)
        model, ckpt = get_model(job.model, job.model_sha256, device)
        axis = AXES.index(slab.axis)
        labels, probs = segment_slab(
            model, np.moveaxis(data, axis, 0), job.normalization or ckpt["normalization"],
            num_classes=job.num_classes, batch_size=job.batch_size, tta=job.tta,
            device=device, with_probabilities=job.probabilities or len(job.axes) > 1,
            context=job.context, before=before, count=slab.num_slices(),
            precision=precision,
            force_support=len(job.axes) == 1,  # orthoplane: on the fused z slices
        )
        labels = np.moveaxis(labels, 0, axis)
        probs = None if probs is None else np.moveaxis(probs, 1, axis + 1)
    t_compute = time.perf_counter()
    region = slab.region(data.shape if slab.axis == "z" else _shape(job))
    if len(job.axes) > 1:
        import zarr

        zarr.open_array(f"{job.scratch}/{slab.axis}", mode="r+")[(slice(None), *region)] = probs
    else:
        write_label_region(job.output, region, labels, probs if job.probabilities else None)
    t_write = time.perf_counter()
    stats = _stats(slab, labels.size, labels.shape[AXES.index(slab.axis)], t0, t_read,
                   t_compute, t_write)
    return stats if precision is None else {**stats, "precision": precision}


def _shape(job: SlabJob) -> tuple[int, int, int]:
    return tuple(get_volume(job.input, job.var, job.mask).shape)  # type: ignore[return-value]


def _run_fuse(job: SlabJob, slab: Slab, t0: float) -> dict:
    import zarr

    parts = []
    for axis in job.axes:
        parts.append(zarr.open_array(f"{job.scratch}/{axis}", mode="r")[:, slab.start:slab.stop])
    support = support_of(job.normalization)
    image = read_slab(job, slab)[0] if is_masked(support) else None
    t_read = time.perf_counter()
    labels, mean = fuse_probabilities(parts, support_outside(image, support))
    t_compute = time.perf_counter()
    region = (slice(slab.start, slab.stop), slice(0, labels.shape[1]), slice(0, labels.shape[2]))
    write_label_region(job.output, region, labels, mean if job.probabilities else None)
    t_write = time.perf_counter()
    return _stats(slab, labels.size, labels.shape[0], t0, t_read, t_compute, t_write)


def _stats(slab, voxels, slices, t0, t_read, t_compute, t_write) -> dict:
    return {
        "slab": slab.key, "stage": slab.stage, "worker": worker_name(),
        "voxels": int(voxels), "slices": int(slices),
        "read_s": t_read - t0, "compute_s": t_compute - t_read, "write_s": t_write - t_compute,
        "seconds": t_write - t0,
    }


def warm_up(job: SlabJob) -> str:
    """Ahead of the first slab (optional): import the I/O stack, open the input, load the
    model and run one z-slice batch through it (the first forward of a shape is slow)."""
    import torch

    _set_threads(job)
    volume = get_volume(job.input, job.var, job.mask)
    if job.method == "model":
        device = resolve_device(job.device)
        model, _ = get_model(job.model, job.model_sha256, device)
        n = min(job.batch_size, volume.shape[0])
        with torch.inference_mode(), autocast(device, resolve_precision(job.precision, device)):
            model(torch.zeros((n, job.context, *volume.shape[1:]), device=device))
    return worker_name()
