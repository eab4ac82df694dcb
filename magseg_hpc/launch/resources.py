"""Which executor and which resources: a job profile plus command-line flags, combined by one
pure function, :func:`executor_parameters` (submitit ``update_parameters`` keywords)."""

from __future__ import annotations

import shutil
from typing import Any

from magseg_hpc.errors import MagsegError
from magseg_hpc.launch.profile import JobProfile

__all__ = ["CLUSTERS", "resolve_cluster", "executor_parameters"]

CLUSTERS = ("slurm", "local", "debug")


def resolve_cluster(requested: str | None) -> str:
    """``slurm`` when sbatch is on PATH, else ``local``, unless ``requested`` says otherwise."""
    if requested not in (None, "auto", *CLUSTERS):
        raise MagsegError(f"unknown cluster {requested!r}; valid: auto, {', '.join(CLUSTERS)}")
    if requested in (None, "auto"):
        return "slurm" if shutil.which("sbatch") else "local"
    if requested == "slurm":
        missing = [cmd for cmd in ("sbatch", "srun") if shutil.which(cmd) is None]
        if missing:
            raise MagsegError(
                f"--cluster slurm but {' and '.join(missing)} not found on PATH; run on a SLURM "
                "login node (or load its module), or use --cluster local"
            )
    return requested


def executor_parameters(
    profile: JobProfile,
    *,
    cluster: str,
    name: str,
    nodes: int | None = None,
    gpus_per_node: int | None = None,
    tasks_per_node: int | None = None,
) -> dict[str, Any]:
    """submitit ``AutoExecutor.update_parameters`` keywords from a profile and flags.

    Pure: no cluster is contacted. One task per GPU; on CPU-only nodes (``gpus_per_node`` 0)
    ``tasks_per_node`` sets the number of DDP processes. Limits of the partition itself are
    SLURM's to check at submission.
    """
    if cluster not in CLUSTERS:
        raise MagsegError(f"unknown cluster {cluster!r}; valid: {', '.join(CLUSTERS)}")
    n_nodes = profile.nodes if nodes is None else nodes
    gpus = profile.gpus_per_node if gpus_per_node is None else gpus_per_node
    tasks = profile.tasks_per_node if tasks_per_node is None else tasks_per_node
    if n_nodes < 1:
        raise MagsegError(f"nodes must be >= 1, got {n_nodes}")
    if gpus < 0:
        raise MagsegError(f"gpus per node must be >= 0, got {gpus}")
    if gpus_per_node == 0 and tasks is None:
        raise MagsegError(
            "--gpus-per-node 0 asks for no GPUs: give --gpus-per-node >= 1 (one process per "
            "GPU), or --tasks-per-node N for N CPU processes per node"
        )
    if tasks is not None and tasks < 1:
        raise MagsegError(f"tasks per node must be >= 1, got {tasks}")
    if gpus > 0:
        if tasks_per_node is not None and tasks_per_node != gpus:
            raise MagsegError(
                f"--tasks-per-node {tasks_per_node} with {gpus} GPUs per node: training runs "
                "one process per GPU; leave --tasks-per-node out (it is for CPU-only nodes)"
            )
        tasks = gpus
    elif tasks is None:
        tasks = 1
    if cluster in ("local", "debug") and n_nodes > 1:
        raise MagsegError(
            f"--cluster {cluster} runs on this machine only: nodes must be 1, got {n_nodes}"
        )
    if cluster == "debug" and tasks > 1:
        raise MagsegError(
            f"--cluster debug runs one process in this one; got {tasks} tasks per node: "
            "use --cluster local for several processes"
        )
    params: dict[str, Any] = {
        "name": name,
        "nodes": n_nodes,
        "tasks_per_node": tasks,
        "gpus_per_node": gpus,
        "cpus_per_task": profile.cpus_per_task,
        "timeout_min": profile.timeout_min,
    }
    if profile.mem_gb is not None:
        params["mem_gb"] = profile.mem_gb
    if cluster == "slurm":
        params["slurm_signal_delay_s"] = profile.signal_delay_s
        for key in ("partition", "account", "qos", "constraint"):
            if getattr(profile, key) is not None:
                params[f"slurm_{key}"] = getattr(profile, key)
        if profile.setup:
            params["slurm_setup"] = list(profile.setup)
        if profile.sbatch_extra:
            params["slurm_additional_parameters"] = dict(profile.sbatch_extra)
    # submitit's AutoExecutor takes no signal delay for the local executor (it uses 30 s).
    return params
