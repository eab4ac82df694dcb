"""segment-volume: plan slabs, submit one task per slab, mark them done, report.

Flow (``run_segment_volume``, the command's and a submitted job's one function):
``SegmentOptions.check`` refuses what needs no data; ``prepare`` checks the rest against the
data (input, variable, checkpoint, axes, a finite-voxel sample, an existing output) and plans,
without writing anything; the output's writer lock is taken once, then the cluster started
(by the caller's ``open_cluster``: launch owns clusters). The run then, as
``segment_volume`` (the library call, on a client of the caller's) does under its own lock:
creates (or reopens, with ``--resume``) the label store, submits every slab task at once with
``client.submit`` (the scheduler queues them: a worker holds as many as it has threads, and
the dashboard shows the whole run), marks each slab done when its future returns, and marks
the store complete only when every slab succeeded.

Orthoplane (``axes`` with several entries): each pass writes uint8-quantised class
probabilities (C, z, y, x) to its own scratch array under ``OUT/.magseg/scratch.zarr``; once
every pass slab is done, fusion slabs read z slabs of all scratch arrays, average them, take
the argmax and write the output. Scratch is deleted when the output is complete.
"""

from __future__ import annotations

import datetime as _dt
import logging
import math
import shutil
import time
import uuid
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Protocol

import dask
import numpy as np

from magseg_hpc import __version__
from magseg_hpc.axes import AXES, parse_axes
from magseg_hpc.classes import ClassTable
from magseg_hpc.data.normalize import (
    DECILES,
    SHIFT_WARNING,
    intensity_shift,
    marks_outside,
    refit_normalization,
)
from magseg_hpc.errors import MagsegError
from magseg_hpc.logfile import CLUSTER_LOGGERS, loggers_to_file
from magseg_hpc.models.checkpoint import checkpoint_sha256, fuses, load_inference_model
from magseg_hpc.outputs import check_no_overlap, check_output
from magseg_hpc.paths import absolute_spec, remove_temp_files
from magseg_hpc.precision import check_precision
from magseg_hpc.segment.blocks import (
    Slab,
    output_chunks,
    plan_passes,
    scratch_chunks,
)
from magseg_hpc.segment.resume import (
    DoneMarkers,
    check_resumable,
    read_run_record,
    state_dir,
    write_run_record,
)
from magseg_hpc.segment.threshold import fit_threshold_params
from magseg_hpc.segment.worker import SlabJob, run_slab, warm_up
from magseg_hpc.staging import (
    begin_staging,
    is_staging,
    promote,
    staging_path,
    writer_lock,
)
from magseg_hpc.volume.io import check_chunk_files, reading
from magseg_hpc.volume.store import (
    LABEL_FORMAT,
    create_label_store,
    open_group,
    refuse_existing,
    set_complete,
)
from magseg_hpc.volume.support import (
    describe,
    inside_pixels,
    is_masked,
    open_input,
    resolve_support,
    support_of,
)

log = logging.getLogger(__name__)

CLUSTER_LOG = "cluster.log"  # under OUT/.magseg/: the dashboard server's and worker's lines

METHODS = ("model", "threshold")
NORMALIZATIONS = ("input", "checkpoint")
DEVICES = ("auto", "cpu", "cuda")
# The finite-voxel pre-check reads evenly spaced z slices, at least 4, up to this many bytes
# (the whole of a small volume): NaN found here fails before any cluster or output exists.
PRECHECK_SLICES = 4
PRECHECK_BYTES = 64 * 2**20


@dataclass(frozen=True)
class SegmentOptions:
    """What one segment-volume run does: the command's options, parsed once. ``prepare``
    checks them against the data; a submitted job carries them as they are."""

    input: str
    output: str
    model: str | None = None
    var: str | None = None
    # "auto" (the planes the model was trained on) until ``prepare`` resolves it
    axes: tuple[str, ...] | str = ("z",)
    batch_size: int = 8
    probabilities: bool = False
    tta: bool = False
    device: str = "auto"
    slab_size: int = 16
    resume: bool = False
    overwrite: bool = False
    method: str = "model"
    # Intensity statistics: "input" fits them on IN the way training fitted them on its
    # volume (percentiles of the sample, masked background left out), so a model moves
    # between volumes of other intensity scales (float vs 8-bit); "checkpoint" reuses the
    # training volume's numbers (bit-identical to validation during training).
    normalization: str = "input"
    torch_threads: int | None = None
    command_line: str | None = None
    # the forward's precision (magseg_hpc.precision): auto takes bf16 where it is native
    precision: str = "auto"
    # where the input's outside is (magseg_hpc.volume.support): auto detects it; a mask file
    # makes the voxels where it is 0 the outside
    outside: str = "auto"
    mask: str | None = None

    def resumed(self) -> SegmentOptions:
        """The same run continued from its done markers (a requeued job's options)."""
        return replace(self, resume=True, overwrite=False)

    def planes(self) -> tuple[str, ...]:
        """The axes asked for, parsed (z for "auto" until ``prepare`` reads the model)."""
        return ("z",) if self.axes == "auto" else parse_axes(self.axes)

    def check(self) -> None:
        """Every check that needs no reading of data: the flags, their combinations and the
        output path (the command's, submit's before submitting, and ``prepare``'s first)."""
        for flag, value in (("--batch-size", self.batch_size), ("--slab-size", self.slab_size)):
            if value < 1:
                raise MagsegError(f"{flag} {value}: must be a positive integer (>= 1)")
        if self.resume and self.overwrite:
            raise MagsegError("--resume and --overwrite exclude each other; pick one")
        check_no_overlap(self.output, [self.input, self.model, self.mask])
        # An existing output must be a store this tool wrote, whatever --resume/--overwrite say
        check_output(self.output, self.overwrite or self.resume, resume_hint=True,
                     expect=LABEL_FORMAT)
        axes = self.planes()
        if self.normalization not in NORMALIZATIONS:
            raise MagsegError(f"--normalization {self.normalization}: choose one of "
                              f"{', '.join(NORMALIZATIONS)}")
        if self.method not in METHODS:
            raise MagsegError(f"--method {self.method}: choose one of {', '.join(METHODS)}")
        if self.device not in DEVICES and not self.device.startswith("cuda:"):
            raise MagsegError(f"--device {self.device}: choose one of {', '.join(DEVICES)}")
        check_precision(self.precision)
        if self.method == "model" and not self.model:
            raise MagsegError("--model CKPT is required (or --method threshold for the baseline)")
        if self.method == "threshold" and (self.tta or self.probabilities or axes != ("z",)):
            raise MagsegError(
                "--method threshold gives labels only: drop --tta, --probabilities and --axes"
            )


@dataclass
class Prepared:
    options: SegmentOptions
    volume: object  # xr.DataArray, lazy
    class_table: ClassTable
    job: SlabJob
    chunks: tuple[int, int, int]
    slabs: list[Slab]
    fields: dict  # the resume fingerprint's inputs
    provenance: dict
    target: str  # the output path; job.output is its staging when ``staged``
    staged: bool = False  # --overwrite of an existing result, or --resume of such a run


@dataclass
class RunSummary:
    output: str
    shape: tuple[int, int, int]
    axes: tuple[str, ...]
    slabs_total: int
    slabs_run: int = 0
    slabs_skipped: int = 0
    failed: list[str] = field(default_factory=list)
    slices: int = 0
    voxels: int = 0  # volume voxels segmented by this run: pass voxels / len(axes)
    seconds: float = 0.0
    per_worker: dict = field(default_factory=dict)
    pass_voxels: int = field(default=0, repr=False)  # voxels of every plane's pass slabs

    @property
    def voxels_per_second(self) -> float:
        return self.voxels / self.seconds if self.seconds > 0 else 0.0

    def format(self) -> str:
        lines = [
            f"segmented {self.output}: volume {'x'.join(map(str, self.shape))}, axes "
            f"{','.join(self.axes)}; {self.slabs_run} slabs run, {self.slabs_skipped} already "
            f"done, {len(self.failed)} failed",
            f"{self.voxels:,} voxels, {self.slices} slices in {self.seconds:.1f} s: "
            f"{self.voxels_per_second:,.0f} voxels/s",
        ]
        for name, w in sorted(self.per_worker.items()):
            lines.append(
                f"  worker {name}{' (' + w['precision'] + ')' if 'precision' in w else ''}: "
                f"{w['slabs']} slabs, {w['seconds']:.1f} s in tasks "
                f"(read {w['read_s']:.1f}, compute {w['compute_s']:.1f}, write {w['write_s']:.1f})"
            )
        return "\n".join(lines)


def _sample_slices(volume) -> np.ndarray:
    nz = volume.shape[0]
    slice_bytes = max(1, math.prod(volume.shape[1:]) * volume.dtype.itemsize)
    n = min(nz, max(PRECHECK_SLICES, PRECHECK_BYTES // slice_bytes))
    idx = sorted({int(round(i)) for i in np.linspace(0, nz - 1, n)})
    return np.asarray(volume.data[idx].compute(scheduler="synchronous"))


@dataclass(frozen=True)
class _Method:
    """What the method decided from the input (and the checkpoint): the workers' numbers."""

    class_table: ClassTable
    model: str | None = None  # the checkpoint's resolved path
    sha256: str | None = None
    model_config: dict | None = None
    threshold: dict = field(default_factory=dict)
    normalization: dict | None = None
    context: int = 1


def prepare(opts: SegmentOptions) -> Prepared:
    """Check everything against the data and plan the run; writes nothing."""
    opts.check()
    auto_axes = opts.axes == "auto"
    opts = replace(opts, axes=opts.planes())
    volume, support = _open_checked(opts)
    if opts.method == "model":
        method, axes = _fit_model(opts, volume, support, auto_axes)
        opts = replace(opts, axes=axes)
    else:
        with dask.config.set(scheduler="synchronous"), reading(opts.input):
            threshold = fit_threshold_params(volume.data, support=support)
        method = _Method(ClassTable.default(), threshold=threshold,
                         model=str(Path(opts.model).resolve()) if opts.model else None)
    shape = tuple(int(n) for n in volume.shape)
    chunks = output_chunks(shape, opts.axes, opts.slab_size)
    pass_chunks = (
        {a: chunks[AXES.index(a)] for a in opts.axes} if len(opts.axes) == 1
        else {a: scratch_chunks(shape, a, opts.slab_size)[1 + AXES.index(a)] for a in opts.axes}
    )
    slabs = plan_passes(shape, opts.axes, pass_chunks, chunks[0], opts.slab_size)
    job = SlabJob(
        input=absolute_spec(opts.input, resolve=True), var=opts.var,
        output=str(Path(opts.output).resolve()),
        axes=opts.axes, num_classes=method.class_table.num_classes, method=opts.method,
        model=method.model, model_sha256=method.sha256, threshold=method.threshold,
        batch_size=opts.batch_size, tta=opts.tta, probabilities=opts.probabilities,
        device=opts.device, torch_threads=opts.torch_threads,
        normalization=method.normalization, context=method.context,
        precision=opts.precision if opts.method == "model" else "fp32",
        mask=str(Path(opts.mask).resolve()) if opts.mask else None,
    )
    fields = _fingerprint(opts, method, job, volume, chunks)
    # Replacing a result happens beside it, so that a kill keeps the old one (staging.py)
    target = job.output
    staged = ((opts.overwrite and Path(target).exists())
              or (opts.resume and is_staging(staging_path(target))))
    if staged:
        job = replace(job, output=str(staging_path(target)))
    if opts.resume and Path(job.output).exists():
        check_resumable(job.output, fields)
    return Prepared(opts, volume, method.class_table, job, chunks, slabs, fields,
                    _provenance(opts, method, job), target, staged)


def _open_checked(opts: SegmentOptions) -> tuple[object, dict]:
    """The input (lazy) and its support decision, refused when it is empty, has lost chunk
    files or shows NaN/inf inside the sample in a sample of z slices."""
    volume = open_input(opts.input, opts.var, opts.mask)
    if min(volume.shape) < 1:
        raise MagsegError(f"{opts.input}: volume is empty (shape {volume.shape})")
    check_chunk_files(opts.input, opts.var or volume.name)  # lost chunks would read as zeros
    with reading(opts.input):
        sample = _sample_slices(volume)
        support = resolve_support(volume, opts.outside, mask=opts.mask)
    log.debug("%s: %s", opts.input, describe(support))
    if sample.dtype.kind == "f" and not (np.isfinite(sample)
                                         | ~inside_pixels(sample, support)).all():
        raise MagsegError(
            f"{opts.input}: NaN or inf voxels (found in a sample of z slices); replace them "
            "(e.g. with 0) before segmenting, or, if NaN marks the outside, pass --outside nan"
        )
    return volume, support


def _fit_model(opts: SegmentOptions, volume, support: dict,
               auto_axes: bool) -> tuple[_Method, tuple[str, ...]]:
    """The model's numbers for this input, and the axes it segments along."""
    model_path = str(Path(opts.model).resolve())
    # Build it once here (CPU) so a checkpoint whose weights do not fit fails now, with
    # nothing written; workers load their own copy from the path.
    _, ckpt = load_inference_model(model_path, device="cpu")
    class_table = ClassTable.from_dict(ckpt["class_table"])
    _check_support(opts.input, support, ckpt["normalization"])
    with dask.config.set(scheduler="synchronous"):
        normalization = refit_normalization(volume.data, ckpt["normalization"],
                                            support=support)
    if opts.normalization == "checkpoint":
        # where the outside is is a property of this input, either way
        normalization = {**ckpt["normalization"], "support": support}
    _warn_intensity_shift(opts.input, ckpt["normalization"], normalization)
    axes = axes_for_auto(ckpt) if auto_axes else opts.axes
    _warn_untrained_axes(ckpt, axes)
    return _Method(class_table, model_path, checkpoint_sha256(model_path), ckpt["model"],
                   normalization=normalization,
                   context=int(ckpt["model"].get("context_slices", 1))), axes


def _fingerprint(opts: SegmentOptions, method: _Method, job: SlabJob, volume,
                 chunks: tuple[int, int, int]) -> dict:
    """What a --resume must find unchanged (the run record's fields)."""
    fields = {
        "method": opts.method, "model_sha256": method.sha256, "threshold": method.threshold,
        "class_table": method.class_table.to_dict(), "normalization": method.normalization,
        "axes": list(opts.axes), "tta": opts.tta, "probabilities": opts.probabilities,
        "slab_size": opts.slab_size, "chunks": list(chunks), "var": opts.var,
        "input_shape": [int(n) for n in volume.shape], "input_dtype": str(volume.dtype),
        "input_chunks": [int(c) for c in volume.data.chunksize],
    }
    if job.precision != "fp32":  # only then, so runs started in fp32 before it still resume
        fields["precision"] = job.precision
    return fields


def _provenance(opts: SegmentOptions, method: _Method, job: SlabJob) -> dict:
    """The label store's provenance: what made it, from what, when."""
    provenance = {
        "command": "segment-volume", "command_line": opts.command_line,
        "input": job.input, "var": opts.var, "method": opts.method,
        "model": method.model, "model_sha256": method.sha256,
        "model_config": method.model_config, "threshold": method.threshold or None,
        "options": {k: v for k, v in asdict(opts).items()
                    if k not in ("input", "output", "model", "command_line")},
        "software": f"magseg-hpc {__version__}",
        "time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    provenance["options"]["axes"] = list(opts.axes)
    return provenance


def _check_support(source: str, support: dict, trained: dict) -> None:
    """A model trained with the outside marked in its input cannot segment an input whose
    outside is not known: it would never see the mark (a confident wrong volume)."""
    if marks_outside(trained) and not is_masked(support):
        raise MagsegError(
            f"{source}: the model was trained on a masked volume "
            f"({describe(support_of(trained))}) but no outside was found in this input "
            f"({describe(support)}); pass --mask PATH or --outside VALUE")


def trained_axes(ckpt: dict) -> tuple[str, ...]:
    """The planes a checkpoint's model was trained on, in z, y, x order (z when unknown)."""
    data = (ckpt.get("config") or {}).get("data") or {}
    trained = data.get("axes") or [data.get("axis") or "z"]
    return tuple(a for a in AXES if a in trained)


# Checkpoints written before the fusion check (magseg_hpc.train.fusion_check) fall back to the
# labelled share: fuse when the labelled slices were at least this share of the training
# volume's. Fusion gained at 8 of 64 (+0.032 mIoU) and lost at 8 of 213 (-0.009 AugSeg), but
# also gained at 2 of 64 (+0.047; phantom.md, phantom_realsize.md, phantom_2slices.md): the
# share is a poor predictor, hence the measured check.
FUSION_MIN_SHARE = 0.1


def axes_for_auto(ckpt: dict) -> tuple[str, ...]:
    """What ``--axes auto`` segments along: the trained planes fused when the checkpoint's
    fusion check (validation slices segmented both ways) scored fusion higher, else the
    labelled axis alone."""
    trained = trained_axes(ckpt)
    data = (ckpt.get("config") or {}).get("data") or {}
    primary = data.get("axis") or "z"
    if len(trained) == 1:
        return trained
    check = ckpt.get("fusion_check")
    if check:
        use = trained if fuses(check) else (primary,)
        log.info("--axes auto: %s (on the %d validation slices at training's end %s alone "
                 "scored mIoU %.4f, fused %s %.4f; --axes overrides)", ",".join(use),
                 len(check["slices"]), primary, check["axis_miou"], ",".join(trained),
                 check["fused_miou"])
        return use
    share = ckpt.get("labelled_share")
    if share is None or share >= FUSION_MIN_SHARE:
        return trained
    others = "/".join(a for a in trained if a != primary)
    log.info("--axes auto: %s only; labelled slices were %.1f %% of the training volume's "
             "(< %.0f %%), so its %s planes saw few labelled rows and fusing them measured "
             "worse (pass --axes %s to fuse anyway)", primary, 100 * share,
             100 * FUSION_MIN_SHARE, others, ",".join(trained))
    return (primary,)


def _warn_intensity_shift(source: str, trained: dict, fitted: dict) -> None:
    """A model meets intensities as it was trained: warn, in one line, when this input's
    scaled intensities are distributed unlike the training volume's."""
    shift = intensity_shift(trained, fitted)
    if shift is not None and shift > SHIFT_WARNING:
        median = DECILES.index(50)
        log.warning("%s: its intensities, each scaled to [0, 1] by its own percentiles, are "
                    "distributed unlike the model's training volume (median %.2f here, %.2f "
                    "there; deciles up to %.2f apart): expect a worse segmentation; check "
                    "--outside / --mask, or label a few slices of this volume and train on "
                    "them", source, fitted["deciles"][median], trained["deciles"][median],
                    shift)


def _warn_untrained_axes(ckpt: dict, axes: tuple[str, ...]) -> None:
    """A model sees planes as it was trained: warn about planes it never saw."""
    data = (ckpt.get("config") or {}).get("data") or {}
    trained = trained_axes(ckpt)
    untrained = [a for a in axes if a not in trained]
    if untrained and data.get("volume"):
        log.warning("--axes %s: the model was trained on %s slices only, not %s; orthoplane "
                    "fusion is then usually worse than --axes %s (train with data.axes: "
                    "[z, y, x])", ",".join(axes), ",".join(trained), ",".join(untrained),
                    trained[0])


def _open_output(prep: Prepared) -> None:
    """Create the label store (or reuse it on resume) and the run record. A new store is
    made in staging from its first byte, with its run record, and only then renamed to the
    output (unless the whole run is staged): a kill at any moment leaves nothing at the
    output, or a store of ours that --resume continues, never one the tool disowns."""
    opts, out = prep.options, prep.job.output
    if opts.resume and read_run_record(out) is not None:
        log.info("resuming %s: %d of %d slabs already done", out,
                 len(DoneMarkers(out).done()), len(prep.slabs))
        remove_temp_files(state_dir(out), ["run.json", "owner.json"])  # a killed run's
    else:
        if Path(prep.target).exists() and not prep.staged:  # (appeared since the checks)
            refuse_existing(prep.target, False, LABEL_FORMAT)
        staging = begin_staging(prep.target)
        create_label_store(
            staging, like=prep.volume, class_table=prep.class_table,
            provenance=prep.provenance, chunks=prep.chunks,
            with_probabilities=opts.probabilities,
        )
        write_run_record(staging, prep.fields)
        if not prep.staged:
            promote(staging, prep.target)
    actual = tuple(open_group(out)["labels"].chunks)
    if actual != tuple(prep.chunks):  # the plan's chunk alignment is what makes writes safe
        raise MagsegError(
            f"{out}: labels are chunked {actual}, expected {prep.chunks}; pass --overwrite"
        )
    if len(opts.axes) > 1:
        _open_scratch(prep)


def _open_scratch(prep: Prepared) -> None:
    import zarr

    shape = tuple(int(n) for n in prep.volume.shape)
    path = Path(prep.job.scratch)
    markers = DoneMarkers(prep.job.output)
    if not path.exists():
        # Pass results live only in scratch: without it, done pass slabs must run again.
        markers.unmark([s.key for s in prep.slabs if s.stage != "fuse"])
    group = zarr.open_group(str(path), mode="a", zarr_format=3)
    for axis in prep.options.axes:
        if axis not in group:
            chunks = (prep.class_table.num_classes,
                      *scratch_chunks(shape, axis, prep.options.slab_size)[1:])
            group.create_array(axis, shape=(prep.class_table.num_classes, *shape),
                               chunks=chunks, dtype="uint8", fill_value=0)
            markers.unmark([s.key for s in prep.slabs if s.stage == axis])


def warm_workers(prep: Prepared, client) -> float:
    """Load the model on every current worker in parallel (one task each); returns seconds.

    Optional: a worker loads it on its first slab anyway. Benchmarks use it to separate
    start-up from steady-state throughput.
    """
    from distributed import wait

    t0 = time.perf_counter()
    futures = [client.submit(warm_up, prep.job, workers=[addr], allow_other_workers=False,
                             pure=False, key=f"warm-up-{uuid.uuid4().hex[:8]}")
               for addr in client.scheduler_info()["workers"]]
    wait(futures)
    for f in futures:
        f.result()
    return time.perf_counter() - t0


class Cluster(Protocol):
    """What a run needs of the cluster it computes on (launch's ``ClusterHandle``)."""

    client: object
    torch_threads: int | None  # None: each worker derives them from its CPUs

    def close_dashboard(self) -> None: ...


def run_segment_volume(
    opts: SegmentOptions, open_cluster: Callable[[int], AbstractContextManager[Cluster]]
) -> RunSummary:
    """One segment-volume run, as the command and a submitted job run it: ``prepare`` (every
    check that can fail on bad input, before any cluster or output exists), the output's
    writer lock (a second writer is refused before any cluster starts), the cluster
    (``open_cluster(volume bytes)``, which starts and announces it), every slab; progress
    goes to stdout."""
    prep = prepare(opts)
    with writer_lock(prep.target, opts.command_line), \
            open_cluster(prep.volume.nbytes) as cluster:
        print(f"{len(prep.slabs)} slabs -> {prep.target}"
              + (f" (written to {prep.job.output}, swapped in when complete)"
                 if prep.staged else ""), flush=True)
        # at the end the dashboard's pages are closed while they show the finished run
        return _segment_locked(prep, client=cluster.client, torch_threads=cluster.torch_threads,
                               on_finished=cluster.close_dashboard)


def segment_volume(
    opts: SegmentOptions | Prepared,
    client,
    *,
    torch_threads: int | None = None,
    progress: bool | None = None,
    on_result: Callable[[dict], None] | None = None,
    on_finished: Callable[[], None] | None = None,
) -> RunSummary:
    """Segment a volume on ``client``'s cluster, holding the output's writer lock. Raises
    MagsegError if any slab failed. ``torch_threads``: each task's (default the options';
    None lets each worker derive them). ``on_finished`` is called once every slab has
    finished, while the scheduler still holds all of the run's tasks and the dashboard's
    lines still go to the cluster log (segment-volume closes its own dashboard's pages there,
    so that they keep the run's final progress)."""
    prep = opts if isinstance(opts, Prepared) else prepare(opts)
    with writer_lock(prep.target, prep.options.command_line):
        return _segment_locked(prep, client=client, torch_threads=torch_threads,
                               progress=progress, on_result=on_result, on_finished=on_finished)


def _segment_locked(prep: Prepared, *, client, torch_threads: int | None = None,
                    progress: bool | None = None, on_result=None, on_finished=None
                    ) -> RunSummary:
    """The run, once its caller holds the output's writer lock."""
    from tqdm import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    _open_output(prep)
    out = prep.job.output
    markers = DoneMarkers(out)
    done = markers.done()
    shape = tuple(int(n) for n in prep.volume.shape)
    summary = RunSummary(prep.target, shape, prep.options.axes, len(prep.slabs))
    summary.slabs_skipped = sum(s.key in done for s in prep.slabs)
    todo = [s for s in prep.slabs if s.key not in done]
    job = prep.job if torch_threads is None else replace(prep.job, torch_threads=torch_threads)
    resources = _gpu_resources(client, prep.options.device)
    t0 = time.perf_counter()
    # lines logged while the bar shows (an in-process worker loading its model) print above
    # it, not through it
    with loggers_to_file(CLUSTER_LOGGERS, Path(out) / ".magseg" / CLUSTER_LOG), \
            logging_redirect_tqdm(tqdm_class=tqdm), \
            tqdm(total=len(todo), unit="slab", desc="segment",
                 disable=(not progress) if progress is not None else None) as bar:
        failures = _run_slabs(client, job, todo, markers, summary, bar, resources,
                              on_result, numbers={s.key: n for n, s in enumerate(prep.slabs)},
                              on_finished=on_finished)
    summary.seconds = time.perf_counter() - t0
    summary.failed = [s.name for s, _ in failures]
    if failures:
        names = ", ".join(summary.failed[:8]) + (" ..." if len(failures) > 8 else "")
        first = failures[0][1]
        # Bad input (MagsegError: NaN voxels, unreadable chunks) stays bad on a resume.
        fix = ("fix the input and start again with --overwrite" if isinstance(first, MagsegError)
               else "fix the cause and rerun with --resume")
        raise MagsegError(
            f"{len(failures)} of {len(prep.slabs)} slabs failed ({names}): "
            f"{type(first).__name__}: {str(first).splitlines()[0] if str(first) else ''}; "
            f"{out} is incomplete, {fix}"
            + (f" (the previous {prep.target} is untouched)" if prep.staged else "")
            + f"; details in {Path(out) / '.magseg' / FAILURES_LOG}"
        )
    if len(prep.options.axes) > 1:
        shutil.rmtree(prep.job.scratch, ignore_errors=True)

    set_complete(out, True, finished=_dt.datetime.now(_dt.timezone.utc).isoformat(
        timespec="seconds"))
    if prep.staged:
        promote(Path(out), prep.target)
    return summary


def _gpu_resources(client, device: str) -> dict | None:
    """Ask for a GPU slot only when every worker advertises one (else tasks would starve)."""
    if device == "cpu" or client is None:
        return None
    workers = client.scheduler_info().get("workers", {}).values()
    if workers and all(w.get("resources", {}).get("GPU") for w in workers):
        return {"GPU": 1}
    return None


def task_key(number: int, slab: Slab, token: str) -> str:
    """``segment-slab-0032-z-<token>``: the slab's number in the run and its plane. Dask
    groups keys by their leading words, so every slab of the run is one progress group
    (``segment-slab``) on the dashboard, whatever its plane."""
    return f"segment-slab-{number:04d}-{slab.stage}-{token}"


def _run_slabs(client, job, slabs, markers, summary, bar, resources, on_result, numbers,
               on_finished=None):
    """Submit every slab to be done at once, so that the scheduler (and its dashboard) knows
    the whole run from the start; fusion slabs wait on every pass slab. Tasks have no inputs,
    so the scheduler queues them and each worker holds only as many as it has threads.
    Returns [(slab, exception)] of the slabs that failed; after a pass slab fails the fusion
    slabs are cancelled (they would read its missing output), not counted as failed.
    ``on_finished()`` runs after the last slab, while the run's futures are still held."""
    from distributed import as_completed

    if not slabs:
        if on_finished is not None:
            on_finished()
        return []
    token = uuid.uuid4().hex[:8]
    passes = [s for s in slabs if s.stage != "fuse"]
    futures = {client.submit(run_slab, job, slab, key=task_key(numbers[slab.key], slab, token),
                             resources=resources, pure=False): slab for slab in passes}
    waits_on = list(futures)
    futures |= {client.submit(run_slab, job, slab, *waits_on,
                              key=task_key(numbers[slab.key], slab, token),
                              resources=resources, pure=False): slab
                for slab in slabs if slab.stage == "fuse"}
    # held to the end: the scheduler keeps finished slabs, so its progress counts all of them
    submitted = list(futures)
    failures = []
    try:
        for fut in as_completed(submitted):
            slab = futures.pop(fut, None)
            if slab is None:  # a fusion slab cancelled below
                continue
            try:
                stats = fut.result()
            except Exception as e:  # noqa: BLE001 - every failure is reported by slab name
                # the terminal gets one line at the end; the traceback goes to the run's log
                log.debug("slab %s failed: %s: %s", slab.name, type(e).__name__, e)
                _log_failure(job.output, slab, e, fut)
                failures.append((slab, e))
                fusions = [f for f, s in futures.items() if s.stage == "fuse"]
                client.cancel(fusions)
                for f in fusions:
                    del futures[f]
            else:
                markers.mark(slab.key)  # only after the write returned
                _account(summary, stats, len(job.axes))
                if on_result is not None:
                    on_result(stats)
            bar.update(1)
    except BaseException:
        client.cancel(list(futures))
        raise
    if on_finished is not None:
        on_finished()  # the futures in ``submitted`` are let go only after it
    del submitted
    return failures


FAILURES_LOG = "failures.log"  # under OUT/.magseg/: each failed slab's error and traceback


def _log_failure(output: str, slab: Slab, error: BaseException, future) -> None:
    import traceback

    try:
        tb = "".join(traceback.format_tb(future.traceback())) if future is not None else ""
    except Exception:  # noqa: BLE001 - the traceback is a courtesy: never fail the report
        tb = ""
    path = Path(output) / ".magseg" / FAILURES_LOG
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(f"{_dt.datetime.now().isoformat(timespec='seconds')} slab {slab.name}: "
                f"{type(error).__name__}: {error}\n{tb}\n")


def _account(summary: RunSummary, stats: dict, n_axes: int) -> None:
    summary.slabs_run += 1
    if stats["stage"] != "fuse":
        summary.slices += stats["slices"]
        # every plane's passes cover the volume once: divide the sum, not each slab's share
        # (ceil per slab over-counted a three-plane run by up to one voxel a slab)
        summary.pass_voxels += stats["voxels"]
        summary.voxels = summary.pass_voxels // n_axes
    w = summary.per_worker.setdefault(
        stats["worker"], {"slabs": 0, "seconds": 0.0, "read_s": 0.0, "compute_s": 0.0,
                          "write_s": 0.0})
    w["slabs"] += 1
    if "precision" in stats:
        w["precision"] = stats["precision"]
    for k in ("seconds", "read_s", "compute_s", "write_s"):
        w[k] += stats[k]


__all__ = ["SegmentOptions", "Prepared", "RunSummary", "prepare", "segment_volume",
           "run_segment_volume", "parse_axes", "state_dir"]
