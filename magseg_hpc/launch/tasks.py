"""The one callable a submitted job runs: ``Task(entry point, spec, run dir)``, and what
every task may set up (its one GPU, its rank log).

A task holds its job's spec (a frozen dataclass of plain data: ``TrainSpec``,
``SegmentSpec``, ``EvaluateSpec``) and the "module:function" that runs it
(:mod:`magseg_hpc.launch.jobs`), so the pickle stays small. Preemption and time limits: SLURM
sends USR2 ``signal_delay_s`` before the limit (and ``scancel --signal=USR2`` preempts);
submitit then calls ``checkpoint()``, which requeues a fresh task with ``spec.resumed()``.
State lives on disk: training resumes from ``checkpoint.pt``, segment-volume from its done
markers, which also covers a plain ``scontrol requeue``.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
from pathlib import Path
from typing import Any

import submitit

from magseg_hpc.logfile import AppendFileHandler
from magseg_hpc.rundir import LOGS_DIR

log = logging.getLogger(__name__)

__all__ = ["Task", "one_gpu_per_process", "setup_rank_logging"]


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


def setup_rank_logging(output_dir: Path, rank: int) -> None:
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


class Task:
    """The callable a job runs, one instance per task (rank): ``entry_point`` ("module:
    function", imported in the job) called with ``(spec, run_dir)`` in ``cwd``, the directory
    the job was submitted from, so relative paths mean what they meant at submission."""

    def __init__(self, entry_point: str, spec: Any, run_dir: str, cwd: str | None = None) -> None:
        self.entry_point = entry_point
        self.spec = spec
        self.run_dir = run_dir  # may contain %j: replaced by the job id inside the job
        self.cwd = cwd

    def __call__(self) -> Any:
        env = submitit.JobEnvironment()
        if self.cwd:
            os.chdir(self.cwd)
        module, _, function = self.entry_point.partition(":")
        run = getattr(importlib.import_module(module), function)
        return run(self.spec, Path(self.run_dir.replace("%j", str(env.job_id))))

    def checkpoint(self, *args: Any, **kwargs: Any) -> submitit.helpers.DelayedSubmission:
        """Called by submitit on preemption or time limit: requeue a fresh task that
        continues the job (``spec.resumed()``); nothing else of this instance is carried."""
        log.info("requeue requested: the job continues from what its run left on disk")
        fresh = Task(self.entry_point, self.spec.resumed(), self.run_dir, self.cwd)
        return submitit.helpers.DelayedSubmission(fresh)
