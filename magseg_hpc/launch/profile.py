"""The job profile (``jobs/*.yaml``): WHERE a job runs and with what resources.

One schema, :class:`JobProfile`, for both launchers: submitit (``python -m magseg_hpc.submit``,
through :func:`magseg_hpc.launch.resources.executor_parameters`) and dask-jobqueue
(``segment-volume --cluster slurm``, through :func:`dask_jobqueue_kwargs`).
"""

from __future__ import annotations

import copy
import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from magseg_hpc.errors import MagsegError
from magseg_hpc.yamlfile import load_yaml

__all__ = ["JobProfile", "job_profile_from_dict", "load_job_profile", "dask_jobqueue_kwargs"]


@dataclass
class JobProfile:
    """WHERE a job runs and with what resources (``jobs/*.yaml``); flags override it."""

    partition: str | None = None
    nodes: int = 1
    gpus_per_node: int = 0
    # DDP processes per node on CPU-only nodes; with GPUs it is always one per GPU.
    tasks_per_node: int | None = None
    cpus_per_task: int = 1
    mem_gb: float | None = None  # per node; null = the partition's default
    timeout_min: int = 60
    # USR2 arrives this long before the time limit: time to write a checkpoint and requeue.
    signal_delay_s: int = 90
    # Requeues after a time limit or preemption before submitit gives up.
    max_num_timeout: int = 3
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    # Other sbatch directives, e.g. {"exclusive": true, "mail-type": "END"}.
    sbatch_extra: dict[str, Any] = field(default_factory=dict)
    # Shell lines run in the batch script before srun (module load, conda activate).
    setup: list[str] = field(default_factory=list)


def _profile_help() -> str:
    return ", ".join(
        f"{f.name}={f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default!r}"  # noqa: E501
        for f in dataclasses.fields(JobProfile)
    )


def _check_type(key: str, value: Any, tp: Any) -> bool:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if value is None:
        return type(None) in args
    if args and type(None) in args:  # Optional[X]
        return any(_check_type(key, value, a) for a in args if a is not type(None))
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is str:
        return isinstance(value, str)
    if origin is list:
        return isinstance(value, list) and all(isinstance(v, str) for v in value)
    if origin is dict:
        return isinstance(value, dict) and all(isinstance(k, str) for k in value)
    raise TypeError(f"unsupported JobProfile annotation {tp!r}")  # pragma: no cover


def job_profile_from_dict(raw: Any, source: str = "job profile") -> JobProfile:
    """Validate a plain mapping into a :class:`JobProfile`, naming the valid keys on error."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise MagsegError(f"{source} must be a YAML mapping; valid keys: {_profile_help()}")
    hints = typing.get_type_hints(JobProfile)
    for key, value in raw.items():
        if key not in hints:
            raise MagsegError(
                f"unknown key {key!r} in {source}; valid keys (with defaults): {_profile_help()}"
            )
        if not _check_type(key, value, hints[key]):
            expected = str(hints[key]).replace("typing.", "")
            raise MagsegError(
                f"{source}: {key} must be {expected}, got {value!r}; "
                f"valid keys (with defaults): {_profile_help()}"
            )
    profile = JobProfile(**copy.deepcopy(raw))
    if profile.mem_gb is not None:
        profile.mem_gb = float(profile.mem_gb)
    for key in ("timeout_min", "cpus_per_task", "signal_delay_s"):
        if getattr(profile, key) < 1:
            raise MagsegError(f"{source}: {key} must be >= 1, got {getattr(profile, key)}")
    if profile.max_num_timeout < 0:
        raise MagsegError(f"{source}: max_num_timeout must be >= 0")
    return profile


def load_job_profile(path: str | Path | None) -> JobProfile:
    """Read ``jobs/*.yaml``; a bare name such as ``local`` means ``jobs/local.yaml``."""
    if path is None:
        return JobProfile()
    p = Path(path)
    if not p.exists() and p.suffix == "" and len(p.parts) == 1:
        p = Path("jobs") / f"{p.name}.yaml"
    try:
        text = p.read_text()
    except OSError as e:
        raise MagsegError(
            f"cannot read job profile {path}: {e.strerror}; see jobs/ for examples"
        ) from None

    try:
        raw = load_yaml(text)
    except yaml.YAMLError as e:
        text = " ".join(str(e).split())
        raise MagsegError(f"job profile {p} is not valid YAML: {text}") from None
    return job_profile_from_dict(raw, f"job profile {p}")


def dask_jobqueue_kwargs(profile: JobProfile, dashboard_address: str) -> dict:
    """``dask_jobqueue.SLURMCluster`` keyword arguments from a profile. Pure, unit-tested.

    One SLURM job is one node: one Dask worker process per GPU (``gpus_per_node``), each with
    ``cpus_per_task`` cores and a ``GPU=1`` resource, so each GPU runs one slab at a time.
    Without GPUs, one worker per job with ``cpus_per_task`` cores. ``nodes`` and
    ``tasks_per_node`` do not apply (the number of jobs is ``--jobs``), nor do the requeue
    settings (``signal_delay_s``, ``max_num_timeout``): a lost worker's slabs are recomputed.
    """
    gpus = profile.gpus_per_node
    processes = max(1, gpus)
    minutes = profile.timeout_min
    extra = []
    for key in ("qos", "constraint"):
        if getattr(profile, key):
            extra.append(f"--{key}={getattr(profile, key)}")
    for key, value in profile.sbatch_extra.items():
        if value is True:
            extra.append(f"--{key}")
        elif value not in (None, False):
            extra.append(f"--{key}={value}")
    if gpus:
        extra.append(f"--gres=gpu:{gpus}")
    mem = profile.mem_gb if profile.mem_gb is not None else 4
    kwargs = {
        "queue": profile.partition,
        "account": profile.account,
        "cores": profile.cpus_per_task * processes,
        "processes": processes,
        "memory": f"{mem:g}GB",
        "walltime": f"{minutes // 60:02d}:{minutes % 60:02d}:00",
        "job_extra_directives": extra,
        "job_script_prologue": [line for line in profile.setup
                                if not str(line).lstrip().startswith("#")],
        "worker_extra_args": ["--resources", "GPU=1"] if gpus else [],
        "scheduler_options": {"dashboard_address": dashboard_address},
    }
    return {k: v for k, v in kwargs.items() if v is not None}
