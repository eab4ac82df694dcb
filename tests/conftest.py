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


# Imports everything once, then starts each command as a forked process of its own session
# (no start-up of seconds per run: the kill tests pay for the command's own work only) and
# kills or waits for it when asked. A command's stdout and stderr go to the file named with
# it (or nowhere).
FORK_SERVER = """
import json, os, signal, sys
from magseg_hpc.cli import build_parser, main
import magseg_hpc.train.loop, magseg_hpc.launch.jobs, magseg_hpc.evaluate, matplotlib.pyplot
import torch._dynamo  # what torch.optim imports when the first optimizer is made
build_parser([])  # every command's module
print("ready", flush=True)
for line in sys.stdin:
    what, arg = line.split(" ", 1)
    if what == "run":
        request = json.loads(arg)
        pid = os.fork()
        if pid == 0:
            os.setsid()
            out = os.open(request["log"] or os.devnull, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
            os.dup2(out, 1), os.dup2(out, 2)
            code = 1
            try:
                code = main(request["argv"])
            finally:
                os._exit(code)
        print(pid, flush=True)
    else:
        if what == "kill":
            os.killpg(int(arg), signal.SIGKILL)
        print(os.waitstatus_to_exitcode(os.waitpid(int(arg), 0)[1]), flush=True)
"""


class CommandServer:
    """``magseg-hpc`` commands as forked processes of one interpreter that imported every
    command once: ``start`` returns the command's pid (its session and process group),
    ``kill`` SIGKILLs that session, ``wait`` waits; both return the exit status."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", FORK_SERVER], text=True,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=REPO,
                                     env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert self.proc.stdout.readline().strip() == "ready"

    def _ask(self, what: str, arg) -> int:
        self.proc.stdin.write(f"{what} {arg}\n")
        self.proc.stdin.flush()
        return int(self.proc.stdout.readline())

    def start(self, argv, log: Path | None = None) -> int:
        import json

        return self._ask("run", json.dumps({"argv": [str(a) for a in argv],
                                            "log": str(log) if log else None}))

    def kill(self, pid: int) -> int:
        return self._ask("kill", pid)

    def wait(self, pid: int) -> int:
        return self._ask("wait", pid)

    def run(self, argv, log: Path | None = None) -> int:
        return self.wait(self.start(argv, log))

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()


@pytest.fixture(scope="session")
def command_server():
    """One CommandServer for the session (its start-up, imports included, paid once)."""
    server = CommandServer()
    yield server
    server.close()


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
