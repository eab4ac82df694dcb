"""Shared fixtures. Tests use real zarr stores on disk, real Dask clusters and a real SLURM."""

from __future__ import annotations

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
