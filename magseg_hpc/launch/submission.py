"""Submitting a task through submitit's public API, and reading back what happened:
SLURM's refusals and a failed job's reason as one line each."""

from __future__ import annotations

import contextlib
import io
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import submitit

from magseg_hpc.errors import MagsegError

log = logging.getLogger(__name__)

__all__ = ["Submission", "submit_callable", "job_state", "job_failure_line"]


def _sbatch_refusal(error: Exception) -> str:
    """SLURM's reason for refusing a submission, as one line."""
    text = str(error)
    lines = [ln.strip() for ln in text.splitlines() if "error:" in ln]
    reasons: list[str] = []
    for line in lines:
        reason = re.sub(r"^sbatch: error: (Batch job submission failed: )?", "", line)
        if reason and reason not in reasons:
            reasons.append(reason)
    return "; ".join(reasons) if reasons else " ".join(text.split())[:300]


@dataclass
class Submission:
    job: Any  # submitit.Job
    cluster: str
    run_dir: Path
    params: dict[str, Any]

    @property
    def job_id(self) -> str:
        return str(self.job.job_id)

    def task_log(self, rank: int = 0, stream: str = "err") -> Path:
        return self.run_dir / f"{self.job_id}_{rank}_log.{stream}"


def submit_callable(
    kind: str,
    fn: Callable[[], Any],
    *,
    cluster: str,
    folder: str | Path,
    params: dict[str, Any],
    max_num_timeout: int = 3,
) -> Submission:
    """Submit ``fn`` (a picklable callable, ideally with a ``checkpoint`` method) as a job.

    ``folder`` may contain ``%j`` (the job id). SLURM refusals become one-line MagsegErrors.
    """
    folder = Path(folder)
    base = folder
    while "%j" in str(base):
        base = base.parent
    new = [p for p in (base.absolute(), *base.absolute().parents) if not p.exists()]
    base.mkdir(parents=True, exist_ok=True)
    before = set(base.iterdir())
    executor = submitit.AutoExecutor(
        folder=folder, cluster=cluster, slurm_max_num_timeout=max_num_timeout,
        local_max_num_timeout=max_num_timeout,
    ) if cluster != "debug" else submitit.AutoExecutor(folder=folder, cluster=cluster)
    executor.update_parameters(**params)
    captured = io.StringIO()
    try:
        # submitit prints sbatch's stderr itself; it is turned into one line below instead.
        with contextlib.redirect_stderr(captured):
            job = executor.submit(fn)
    except (submitit.core.utils.FailedJobError, OSError) as e:
        for leftover in set(base.iterdir()) - before:  # the pickle and script of the failure
            if leftover.is_file():
                leftover.unlink()
        for made in new:  # a refused job leaves no empty runs/<name>/ behind
            with contextlib.suppress(OSError):
                made.rmdir()
        raise MagsegError(f"SLURM refused the {kind} job: {_sbatch_refusal(e)}") from None
    run_dir = Path(str(folder).replace("%j", str(job.job_id)))
    log.debug("submitted %s job %s to %s, run dir %s", kind, job.job_id, cluster, run_dir)
    return Submission(job=job, cluster=cluster, run_dir=run_dir, params=params)


def job_failure_line(error: Exception) -> str:
    """A failed job's reason, one line: the last error line of its traceback."""
    text = str(error).strip()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not set(ln.strip()) <= {"-"}]
    errors = [ln for ln in lines if "Error" in ln.split(":")[0] or ln.startswith("magseg")]
    return (errors[-1] if errors else (lines[-1] if lines else repr(error)))[:400]


def job_state(job: Any) -> str:
    """The job's state asked afresh (submitit's cached one may be stale after a requeue)."""
    try:
        info = job.get_info(mode="force")
    except Exception:  # noqa: BLE001 - the state is informative only
        return str(job.state)
    return str(info.get("State") or info.get("jobState") or job.state)
