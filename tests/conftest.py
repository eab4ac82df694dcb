"""Shared fixtures. Tests use real zarr stores on disk, real Dask clusters and a real SLURM."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]


def run_cli(*args, cwd: Path | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run ``magseg-hpc ARGS`` in a fresh interpreter, as a user would."""
    return subprocess.run(
        [sys.executable, "-m", "magseg_hpc.cli", *map(str, args)],
        capture_output=True, text=True, cwd=cwd or REPO, timeout=timeout,
    )


@pytest.fixture
def cli():
    return run_cli


@pytest.fixture
def oracle_volume() -> np.ndarray:
    """An odd-shaped float32 volume with distinct values everywhere."""
    rng = np.random.default_rng(7)
    return rng.normal(size=(11, 37, 29)).astype(np.float32)


@pytest.fixture(scope="session")
def slurm_cluster() -> None:
    """The local SLURM cluster of slurm/start.sh; missing, it fails tests in CI (env CI)."""
    problem = None
    if shutil.which("sinfo") is None:
        problem = "sinfo not found"
    else:
        probe = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True)
        if probe.returncode != 0:
            problem = f"sinfo failed: {probe.stderr.strip()}"
        elif shutil.which("sacct") is None or subprocess.run(
                ["sacctmgr", "-n", "show", "cluster"], capture_output=True).returncode != 0:
            problem = "no SLURM accounting (slurmdbd), which submitit needs for job states"
    if problem:
        message = f"no local SLURM cluster ({problem}): run `bash slurm/install.sh && " \
                  "bash slurm/start.sh` as root"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)


@pytest.fixture(scope="session")
def two_nodes(slurm_cluster) -> list[str]:
    """The two-node cluster of slurm/start.sh (n1, n2); fewer nodes fail in CI, else skip."""
    out = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %T"], capture_output=True,
                         text=True).stdout
    usable = sorted({line.split()[0] for line in out.splitlines()
                     if line.split()[1].rstrip("*~#$@") in
                     ("idle", "mixed", "allocated", "completing")})
    if len(usable) < 2:
        message = (f"the SLURM cluster has {len(usable)} usable node(s) ({out.strip()!r}); "
                   "multi-node tests need two: `bash slurm/start.sh` without --single-node")
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return usable
