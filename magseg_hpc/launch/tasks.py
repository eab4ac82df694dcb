"""The callables a submitted job runs (one instance per task), and what every task sets up:
its one GPU, its rank log, the run directory's owner marker.

Tasks hold plain data only (config dict, paths, argv), so the pickle stays small and readable
by a later version. Preemption and time limits: SLURM sends USR2 ``signal_delay_s`` before
the limit (and ``scancel --signal=USR2`` preempts); submitit then calls the task's
``checkpoint()``, which requeues a fresh task. State lives on disk: every start resumes from
``checkpoint.pt`` when it exists, which also covers a plain ``scontrol requeue``.
"""

from __future__ import annotations

import copy
import importlib
import json
import logging
import os
import shlex
import socket
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import submitit

from magseg_hpc.config import config_from_dict
from magseg_hpc.cpus import process_cpus
from magseg_hpc.errors import MagsegError
from magseg_hpc.logfile import AppendFileHandler
from magseg_hpc.rundir import LOGS_DIR, SUBMISSION_FILE

log = logging.getLogger(__name__)

__all__ = ["SUBMISSION_FILE", "one_gpu_per_process", "TrainTask", "CommandTask"]



class _NotLoggedElsewhere(logging.Filter):
    """Drops package records that a handler on the ``magseg_hpc`` logger already writes to
    the same file (the training's own per-rank log), so no line appears twice."""

    def __init__(self, path: Path) -> None:
        super().__init__()
        self.path = str(path.absolute())

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.name.startswith("magseg_hpc"):
            return True
        return not any(getattr(h, "baseFilename", None) == self.path
                       for h in logging.getLogger("magseg_hpc").handlers)


def _setup_rank_logging(output_dir: Path, rank: int) -> None:
    """Every rank logs to ``logs/rank<R>.log`` and to its stderr (submitit's per-task file)."""
    path = output_dir / LOGS_DIR / f"rank{rank}.log"
    path.parent.mkdir(parents=True, exist_ok=True)
    fmt = logging.Formatter(f"%(asctime)s rank{rank} %(levelname)s %(name)s: %(message)s")
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, "_magseg_rank_handler", False):
            root.removeHandler(handler)
            handler.close()
    file_handler = AppendFileHandler(path)
    file_handler.addFilter(_NotLoggedElsewhere(path))
    for handler in (file_handler, logging.StreamHandler(sys.stderr)):
        handler.setFormatter(fmt)
        handler._magseg_rank_handler = True  # type: ignore[attr-defined]
        root.addHandler(handler)
    root.setLevel(logging.INFO)


def one_gpu_per_process(local_rank: int, local_world_size: int) -> str | None:
    """Give this process one GPU of its node: the ``local_rank``-th of the devices SLURM (or
    the local executor) made visible to the node's tasks, when there is one per task.

    Sets ``CUDA_VISIBLE_DEVICES`` to that one index and ``MAGSEG_GPU_PER_PROCESS=1`` (the
    training then uses ``cuda:0``); returns the index, or None when nothing was changed (no
    GPUs, or SLURM already bound one GPU per task).
    """
    visible = [d for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    if len(visible) < 2 or len(visible) != local_world_size:
        return None
    os.environ["CUDA_VISIBLE_DEVICES"] = visible[local_rank].strip()
    os.environ["MAGSEG_GPU_PER_PROCESS"] = "1"
    return os.environ["CUDA_VISIBLE_DEVICES"]


class TrainTask:
    """The callable a training job runs: one instance per task (rank).

    Holds plain data only (the resolved config as a dict and the output dir), so the pickle
    stays small and readable by a later version; the work is :func:`run_training`.
    """

    def __init__(self, config: dict, output_dir: str, submission_id: str,
                 resume_any: bool = False,
                 entry_point: str = "magseg_hpc.train:run_training") -> None:
        self.config = config
        # May contain %j: replaced by the job id inside the job.
        self.output_dir = output_dir
        self.submission_id = submission_id
        # An explicit --output-dir may be resumed by any later submission.
        self.resume_any = resume_any
        # "module:function" taking (ExperimentConfig, output_dir) -> dict; imported in the job.
        self.entry_point = entry_point

    def resolve_output_dir(self, job_id: str) -> Path:
        return Path(self.output_dir.replace("%j", job_id))

    def _claim_output_dir(self, output_dir: Path, job_id: str, rank: int) -> None:
        """Refuse a run dir made by another submission (e.g. job ids reused after a reset)."""
        marker = output_dir / SUBMISSION_FILE
        if marker.exists():
            previous = json.loads(marker.read_text())
            if previous.get("submission_id") != self.submission_id and not self.resume_any:
                raise MagsegError(
                    f"run dir {output_dir} holds job {previous.get('job_id')} of another "
                    "submission (were SLURM job ids reset?); move it away and resubmit"
                )
        if rank == 0:
            record = {"submission_id": self.submission_id, "job_id": job_id,
                      "host": socket.gethostname(), "started": time.strftime("%FT%T%z")}
            tmp = marker.with_name(f".{marker.name}.tmp")
            tmp.write_text(json.dumps(record, indent=1) + "\n")
            tmp.replace(marker)

    def __call__(self) -> dict:
        env = submitit.JobEnvironment()
        # overwrite: sbatch passes the submitting shell's MASTER_ADDR/RANK... on.
        # CUDA_VISIBLE_DEVICES: set below from what SLURM gave the node (submitit would set
        # it to the local rank, which is wrong when SLURM hands out e.g. GPUs 2,3).
        dist_env = submitit.helpers.TorchDistributedEnvironment().export(
            set_cuda_visible_devices=False, overwrite=True
        )
        gpu = one_gpu_per_process(dist_env.local_rank, dist_env.local_world_size)
        output_dir = self.resolve_output_dir(env.job_id)
        output_dir.mkdir(parents=True, exist_ok=True)
        _setup_rank_logging(output_dir, dist_env.rank)
        log.info("job %s on %s: rank %d of %d (local rank %d of %d, node %d of %d), "
                 "CUDA_VISIBLE_DEVICES=%s, master %s:%s, output %s",
                 env.job_id, env.hostname, dist_env.rank, dist_env.world_size,
                 dist_env.local_rank, dist_env.local_world_size, env.node, env.num_nodes,
                 gpu if gpu is not None else os.environ.get("CUDA_VISIBLE_DEVICES", "-"),
                 dist_env.master_addr, dist_env.master_port, output_dir)
        self._claim_output_dir(output_dir, env.job_id, dist_env.rank)
        module, _, function = self.entry_point.partition(":")
        run_training = getattr(importlib.import_module(module), function)

        config = copy.deepcopy(self.config)
        if not config.get("train", {}).get("threads"):
            # torch threads from this task's allocation, not the node's core count
            config.setdefault("train", {})["threads"] = process_cpus(dist_env.local_world_size)
        log.info("torch threads on CPU: %s", config["train"]["threads"])
        result = run_training(config_from_dict(config), output_dir)
        log.info("rank %d finished: %s", dist_env.rank, json.dumps(result, default=str))
        return result

    def checkpoint(self, *args: Any, **kwargs: Any) -> submitit.helpers.DelayedSubmission:
        """Called by submitit on preemption/time limit: requeue a fresh task.

        The training state is on disk (``checkpoint.pt``), so nothing from this instance but
        its constructor arguments is carried over.
        """
        log.info("requeue requested: the job will resume from its run dir's checkpoint.pt")
        fresh = TrainTask(self.config, self.output_dir, self.submission_id, self.resume_any,
                          self.entry_point)
        return submitit.helpers.DelayedSubmission(fresh)


class CommandTask:
    """The callable a ``submit segment`` / ``submit evaluate`` job runs: one ``magseg-hpc``
    command (``argv`` as after ``magseg-hpc``), in the directory it was submitted from.

    A non-zero exit raises, so the job fails visibly. On preemption or time limit
    ``checkpoint()`` requeues the same command, with ``--resume`` added for segment-volume
    (it continues from its done markers); other commands simply rerun.
    """

    def __init__(self, argv: Sequence[str], cwd: str, run_dir: str) -> None:
        self.argv = list(argv)
        self.cwd = cwd
        self.run_dir = run_dir  # may contain %j: replaced by the job id inside the job

    def __call__(self) -> dict:
        # the job runs a magseg-hpc command, above this layer: an import-linter exception in
        # pyproject.toml (typed command specs would remove it)
        from magseg_hpc import cli

        env = submitit.JobEnvironment()
        run_dir = Path(self.run_dir.replace("%j", str(env.job_id)))
        _setup_rank_logging(run_dir, 0)
        os.chdir(self.cwd)  # relative paths mean what they meant at submission
        command = shlex.join(["magseg-hpc", *self.argv])
        log.info("job %s on %s: %s (in %s)", env.job_id, env.hostname, command, self.cwd)
        status = cli.main(self.argv)  # the command line it records is this argv
        if status != 0:
            raise MagsegError(f"{command} exited with status {status}; "
                              f"see {run_dir / LOGS_DIR / 'rank0.log'}")
        log.info("finished: %s", command)
        return {"command": command, "exit_status": status}

    def checkpoint(self, *args: Any, **kwargs: Any) -> submitit.helpers.DelayedSubmission:
        argv = list(self.argv)
        if argv[:1] == ["segment-volume"] and "--resume" not in argv:
            argv = [a for a in argv if a != "--overwrite"] + ["--resume"]
        log.info("requeue requested: rerunning %s", shlex.join(["magseg-hpc", *argv]))
        return submitit.helpers.DelayedSubmission(CommandTask(argv, self.cwd, self.run_dir))
