"""The CPUs this process may use: the one thread policy of training, workers and launchers.

Never ``os.cpu_count()`` alone: on a shared 128-core node with 8 CPUs allocated (the
affinity mask, or SLURM_CPUS_PER_TASK) it oversubscribes 16x.
"""

from __future__ import annotations

import os


def available_cores() -> int:
    """The CPUs in this process's affinity mask (``os.cpu_count()`` where there is none)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def process_cpus(local_world_size: int = 1) -> int:
    """CPUs for one of ``local_world_size`` processes on this node: ``SLURM_CPUS_PER_TASK``
    (capped by the affinity mask) under SLURM, else a share of the affinity mask."""
    affinity = available_cores()
    per_task = os.environ.get("SLURM_CPUS_PER_TASK", "")
    if per_task.isdigit() and int(per_task) > 0:
        return max(1, min(int(per_task), affinity))
    return max(1, affinity // max(1, local_world_size))
