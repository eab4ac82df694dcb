"""The one callable a submitted job runs: ``Task(function, spec, run dir)``, and what every
task may set up (its one GPU, its log lines on stderr).

A task holds its job's spec (a frozen dataclass of plain data: ``TrainSpec``,
``SegmentSpec``, ``EvaluateSpec``) and the module-level function that runs it (a ``*_job``
function of :mod:`magseg_hpc.launch.jobs`). Pickle stores a function by its module and name,
so the pickle stays small and the job imports the function as it unpickles the task; a
lambda or a nested function cannot be pickled and is refused at submission. Preemption and
time limits: SLURM
sends USR2 ``signal_delay_s`` before the limit (and ``scancel --signal=USR2`` preempts);
submitit then calls ``checkpoint()``, which requeues a fresh task with ``spec.resumed()``.
State lives on disk: training resumes from ``checkpoint.pt``, segment-volume from its done
markers, which also covers a plain ``scontrol requeue``.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import submitit

from magseg_hpc.logfile import rank_formatter

log = logging.getLogger(__name__)

__all__ = ["Task", "one_gpu_per_process", "log_to_stderr"]


def log_to_stderr(rank: int) -> None:
    """This task's records, INFO and up, on its stderr (submitit's per-task log file), each
    line naming the rank. The debug executor runs every task in the submitting process: the
    handler of an earlier task is replaced, not added to. The rank's log file is
    ``logfile.rank_log``, opened by what the task runs."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, "_magseg_task_handler", False):
            root.removeHandler(handler)
            handler.close()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(rank_formatter(rank))
    handler._magseg_task_handler = True  # type: ignore[attr-defined]
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


class Task:
    """The callable a job runs, one instance per task (rank): ``function`` (a module-level
    function) called with ``(spec, run_dir)`` in ``cwd``, the directory the job was submitted
    from, so relative paths mean what they meant at submission."""

    def __init__(self, function: Callable[[Any, Path], Any], spec: Any, run_dir: str,
                 cwd: str | None = None) -> None:
        self.function = function
        self.spec = spec
        self.run_dir = run_dir  # may contain %j: replaced by the job id inside the job
        self.cwd = cwd

    def __call__(self) -> Any:
        env = submitit.JobEnvironment()
        if self.cwd:
            os.chdir(self.cwd)
        return self.function(self.spec, Path(self.run_dir.replace("%j", str(env.job_id))))

    def checkpoint(self, *args: Any, **kwargs: Any) -> submitit.helpers.DelayedSubmission:
        """Called by submitit on preemption or time limit: requeue a fresh task that
        continues the job (``spec.resumed()``); nothing else of this instance is carried."""
        log.info("requeue requested: the job continues from what its run left on disk")
        fresh = Task(self.function, self.spec.resumed(), self.run_dir, self.cwd)
        return submitit.helpers.DelayedSubmission(fresh)
