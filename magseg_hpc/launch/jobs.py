"""What each kind of job runs, from its spec: training (DDP, one task per rank), one
segment-volume run (on a Dask cluster of its own), one evaluation.

The command line builds the spec once from its arguments (``magseg-hpc segment-volume`` runs
``run_segment_volume(spec.options, spec.cluster_for)`` in its own process, as
``segment_job`` does); ``submit`` puts the same spec in a
:class:`~magseg_hpc.launch.tasks.Task` with one of the ``*_job`` functions below, which
the job calls. Every spec is frozen plain data with ``resumed()``: the spec of the same job
continued after a requeue.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import submitit

from magseg_hpc.config import config_from_dict
from magseg_hpc.cpus import process_cpus
from magseg_hpc.errors import MagsegError
from magseg_hpc.evaluate import EvaluateSpec, run_evaluation
from magseg_hpc.launch.dask_cluster import DEFAULT_DASHBOARD, ClusterHandle, open_cluster
from magseg_hpc.launch.tasks import log_to_stderr, one_gpu_per_process
from magseg_hpc.logfile import rank_log
from magseg_hpc.rundir import LOGS_DIR, SubmissionRecord
from magseg_hpc.segment.pipeline import SegmentOptions, run_segment_volume

log = logging.getLogger(__name__)

__all__ = ["TrainSpec", "ClusterOptions", "SegmentSpec", "SMALL_VOLUME_BYTES", "train_job",
           "segment_job", "evaluate_job"]

# A volume this small is done by one worker, and starting a worker process (Python, torch,
# the model: seconds) would dominate: the local worker then runs in this process.
SMALL_VOLUME_BYTES = 256 * 2**20


# --- training -------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainSpec:
    """A training job: the resolved experiment config (a dict, as in config.yaml)."""

    config: dict
    submission_id: str
    # An explicit --output-dir may be resumed by any later submission.
    resume_any: bool = False

    def resumed(self) -> TrainSpec:
        return self  # every start resumes from the run dir's checkpoint.pt


def train_job(spec: TrainSpec, run_dir: Path) -> dict:
    """One rank of a training job: its distributed environment, its GPU, its log, then the
    training (which claims the run folder for this submission and resumes from
    ``checkpoint.pt`` when there is one)."""
    # the training's modules (torch's autograd, the models, TensorBoard) load in the job only
    from magseg_hpc.train import run_training

    env = submitit.JobEnvironment()
    # overwrite: sbatch passes the submitting shell's MASTER_ADDR/RANK... on.
    # CUDA_VISIBLE_DEVICES: set below from what SLURM gave the node (submitit would set
    # it to the local rank, which is wrong when SLURM hands out e.g. GPUs 2,3).
    dist_env = submitit.helpers.TorchDistributedEnvironment().export(
        set_cuda_visible_devices=False, overwrite=True
    )
    gpu = one_gpu_per_process(dist_env.local_rank, dist_env.local_world_size)
    log_to_stderr(dist_env.rank)
    # the training opens the same rank log: the job's lines and a requeue's go in it too
    with rank_log(run_dir / LOGS_DIR, dist_env.rank):
        log.info("job %s on %s: rank %d of %d (local rank %d of %d, node %d of %d), "
                 "CUDA_VISIBLE_DEVICES=%s, master %s:%s, output %s",
                 env.job_id, env.hostname, dist_env.rank, dist_env.world_size,
                 dist_env.local_rank, dist_env.local_world_size, env.node, env.num_nodes,
                 gpu if gpu is not None else os.environ.get("CUDA_VISIBLE_DEVICES", "-"),
                 dist_env.master_addr, dist_env.master_port, run_dir)
        config = copy.deepcopy(spec.config)
        if not config.get("train", {}).get("threads"):
            # torch threads from this task's allocation, not the node's core count
            config.setdefault("train", {})["threads"] = process_cpus(dist_env.local_world_size)
        log.info("torch threads on CPU: %s", config["train"]["threads"])
        submission = SubmissionRecord(spec.submission_id, str(env.job_id), spec.resume_any)
        result = run_training(config_from_dict(config), run_dir, submission=submission)
        log.info("rank %d finished: %s", dist_env.rank, json.dumps(result, default=str))
    return result


# --- segment-volume -------------------------------------------------------------------------


@dataclass(frozen=True)
class ClusterOptions:
    """Where a segment-volume run computes (``open_cluster``'s arguments)."""

    scheduler: str | None = None
    cluster: str | None = None
    job: str | None = None
    jobs: int = 1
    workers: int | None = None
    threads_per_worker: int | None = None
    dashboard_address: str = DEFAULT_DASHBOARD
    in_process: bool = False


@dataclass(frozen=True)
class SegmentSpec:
    """One segment-volume run: what it does and where it computes."""

    options: SegmentOptions
    cluster: ClusterOptions = field(default_factory=ClusterOptions)

    def resumed(self) -> SegmentSpec:
        return replace(self, options=self.options.resumed())

    def runs_in_process(self, volume_bytes: int) -> bool:
        """The default local cluster on a small volume: its one worker in this process."""
        c = self.cluster
        return (c.scheduler is None and c.cluster is None and c.workers is None
                and volume_bytes <= SMALL_VOLUME_BYTES)

    @contextlib.contextmanager
    def cluster_for(self, volume_bytes: int) -> Iterator[ClusterHandle]:
        """The run's cluster for a volume of ``volume_bytes``, started and announced (what
        ``run_segment_volume`` opens once it holds the output's writer lock)."""
        c, small = self.cluster, self.runs_in_process(volume_bytes)
        with open_cluster(
            scheduler=c.scheduler, cluster=c.cluster, job=c.job, jobs=c.jobs,
            workers=1 if small else c.workers, threads_per_worker=c.threads_per_worker,
            device=self.options.device, dashboard_address=c.dashboard_address,
            processes=not (c.in_process or small),
        ) as handle:
            handle.announce()
            if small and not c.in_process:
                print(f"one worker in this process: a {volume_bytes / 2**20:.0f} MiB volume "
                      "needs no worker process started (--workers N starts N)", flush=True)
            yield handle


def _command_job(what: str, run, spec, run_dir: Path) -> dict:
    """A one-task job: rank 0's log in the run dir, a failure raised so the job fails."""
    env = submitit.JobEnvironment()
    log_to_stderr(0)
    with rank_log(run_dir / LOGS_DIR, 0) as path:
        log.info("job %s on %s: %s (in %s)", env.job_id, env.hostname, what, Path.cwd())
        try:
            result = run(spec)
        except MagsegError as e:
            raise MagsegError(f"{what}: {e}; see {path}") from e
        log.info("finished: %s", what)
    return result


def segment_job(spec: SegmentSpec, run_dir: Path) -> dict:
    def run(s: SegmentSpec) -> dict:
        summary = run_segment_volume(s.options, s.cluster_for)
        print(summary.format(), flush=True)
        return {"command": s.options.command_line, "output": summary.output,
                "slabs_run": summary.slabs_run, "seconds": summary.seconds}

    return _command_job(spec.options.command_line or "segment-volume", run, spec, run_dir)


def evaluate_job(spec: EvaluateSpec, run_dir: Path) -> dict:
    def run(s: EvaluateSpec) -> dict:
        ev = run_evaluation(s)
        return {"command": s.command_line, "miou": ev.scores["miou"]}

    return _command_job(spec.command_line or "evaluate", run, spec, run_dir)
