"""segment-volume with Dask workers started as SLURM jobs on the local cluster (slurm/start.sh)."""

from __future__ import annotations

import getpass
import subprocess
import sys

import numpy as np
import pytest
from segment_utils import (
    is_complete,
    make_checkpoint,
    make_volume,
    read_labels,
    reference_probabilities,
    write_input,
)

pytestmark = pytest.mark.slurm


def my_jobs() -> list[str]:
    out = subprocess.run(["squeue", "-h", "-u", getpass.getuser(), "-o", "%i %j"],
                         capture_output=True, text=True, check=True).stdout
    return [line for line in out.splitlines() if "dask-worker" in line]


@pytest.fixture
def slurm(slurm_cluster):
    before = my_jobs()
    if before:
        pytest.skip(f"dask-worker jobs already queued: {before}")


def worker_jobs_nodes() -> dict[str, str]:
    """Job id -> node list of every dask-worker job SLURM accounting knows (today)."""
    out = subprocess.run(["sacct", "-X", "-n", "-P", "-o", "JobID,JobName,NodeList"],
                         capture_output=True, text=True, check=True).stdout
    return {f[0]: f[2] for f in (line.split("|") for line in out.splitlines())
            if len(f) == 3 and f[1] == "dask-worker"}


def test_slurm_workers_segment_and_leave_no_jobs(slurm, two_nodes, tmp_path):
    volume = make_volume((9, 33, 25))
    inp = write_input(tmp_path / "in.zarr", volume, (4, 16, 16))
    ckpt = make_checkpoint(tmp_path / "ckpt.pt")
    out = tmp_path / "out.zarr"
    # Like jobs/local.yaml, with memory for a torch worker (about 0.8 GB resident) and one
    # fake GPU per job, so the gres and GPU-resource path is exercised (the model runs on CPU).
    # exclusive: one worker job per node, so the two jobs run on the two nodes (n1, n2) and
    # their workers reach the scheduler, in the root namespace, across the bridge.
    profile = tmp_path / "dask_workers.yaml"
    profile.write_text("partition: debug\nnodes: 1\ngpus_per_node: 1\ncpus_per_task: 1\n"
                       "mem_gb: 3\ntimeout_min: 10\nsbatch_extra: {exclusive: true}\n")
    before = worker_jobs_nodes()
    result = subprocess.run(
        [sys.executable, "-m", "magseg_hpc.cli", "segment-volume", str(inp), str(out),
         "--model", str(ckpt), "--slab-size", "4", "--cluster", "slurm",
         "--job", str(profile), "--jobs", "2", "--normalization", "checkpoint",
         "--dashboard-address", ":0"],
        capture_output=True, text=True, cwd=tmp_path, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "SLURM: 2 jobs" in result.stdout
    np.testing.assert_array_equal(read_labels(out),
                                  reference_probabilities(ckpt, volume).argmax(0))
    assert is_complete(out)
    assert my_jobs() == []  # every worker job was cancelled
    new = {job: nodes for job, nodes in worker_jobs_nodes().items() if job not in before}
    assert len(new) == 2, new
    assert sorted(new.values()) == two_nodes[:2], new  # one worker job on each node
