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


def test_slurm_workers_segment_and_leave_no_jobs(slurm, tmp_path):
    volume = make_volume((9, 33, 25))
    inp = write_input(tmp_path / "in.zarr", volume, (4, 16, 16))
    ckpt = make_checkpoint(tmp_path / "ckpt.pt")
    out = tmp_path / "out.zarr"
    # Like jobs/local.yaml, with memory for a torch worker (about 0.8 GB resident) and one
    # fake GPU per job, so the gres and GPU-resource path is exercised (the model runs on CPU).
    profile = tmp_path / "dask_workers.yaml"
    profile.write_text("partition: debug\nnodes: 1\ngpus_per_node: 1\ncpus_per_task: 1\n"
                       "mem_gb: 3\ntimeout_min: 10\n")
    result = subprocess.run(
        [sys.executable, "-m", "magseg_hpc.cli", "segment-volume", str(inp), str(out),
         "--model", str(ckpt), "--slab-size", "4", "--cluster", "slurm",
         "--job", str(profile), "--jobs", "2",
         "--dashboard-address", ":0"],
        capture_output=True, text=True, cwd=tmp_path, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "SLURM: 2 jobs" in result.stdout
    np.testing.assert_array_equal(read_labels(out),
                                  reference_probabilities(ckpt, volume).argmax(0))
    assert is_complete(out)
    assert my_jobs() == []  # every worker job was cancelled
