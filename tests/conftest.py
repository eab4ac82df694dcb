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
# The model of the tests' trainings: the smallest backbone, a quarter of the usual width and a
# narrow decoder (a checkpoint of a few MB instead of resnet18's ~190 MB); what a test checks
# does not depend on the model's size.
TINY_MODEL = {"backbone": "resnet10", "width": 16, "decoder_channels": 32}
TINY_MODEL_ARGS = [f"model.{key}={value}" for key, value in TINY_MODEL.items()]


# Imports everything once, then starts each command as a forked process of its own session
# (no start-up of seconds per run: the kill tests pay for the command's own work only) and
# kills or waits for it when asked. A command's stdout and stderr go to the files named with
# it (or nowhere); it runs with the environment given, else the server's.
FORK_SERVER = """
import faulthandler, json, os, signal, sys
from magseg_hpc import submit
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
            flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND
            out = os.open(request["out"] or os.devnull, flags)
            err = os.open(request["err"], flags) if request["err"] else out
            os.dup2(out, 1), os.dup2(err, 2)
            faulthandler.enable()  # a crash's stack in the command's log
            if request["env"] is not None:
                os.environ.clear()
                os.environ.update(request["env"])
            code = 1
            try:
                entry = submit.main if request["entry"] == "submit" else main
                code = entry(request["argv"])
            except SystemExit as e:  # argparse's refusals
                code = e.code if isinstance(e.code, int) else 1
            finally:
                sys.stdout.flush(), sys.stderr.flush()
                os._exit(code)
        print(pid, flush=True)
    else:
        if what == "kill":
            os.killpg(int(arg), signal.SIGKILL)
        print(os.waitstatus_to_exitcode(os.waitpid(int(arg), 0)[1]), flush=True)
"""


class CommandServer:
    """``magseg-hpc`` commands (and ``python -m magseg_hpc.submit``) as forked processes of
    one interpreter that imported every command once: ``start`` returns the command's pid
    (its session and process group), ``kill`` SIGKILLs that session, ``wait`` waits; both
    return the exit status. ``run`` is a command to its end as a CompletedProcess."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", FORK_SERVER], text=True,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=REPO,
                                     env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert self.proc.stdout.readline().strip() == "ready"

    def _ask(self, what: str, arg) -> int:
        self.proc.stdin.write(f"{what} {arg}\n")
        self.proc.stdin.flush()
        return int(self.proc.stdout.readline())

    def start(self, argv, log: Path | None = None, *, err: Path | None = None,
              env: dict | None = None) -> int:
        """Start ``magseg-hpc ARGV`` (``submit ...``: the submit module's command), its
        stdout to ``log`` and its stderr there too, or to ``err``."""
        import json

        argv = [str(a) for a in argv]
        entry = "submit" if argv[:1] == ["submit"] else "cli"
        return self._ask("run", json.dumps({
            "argv": argv[1:] if entry == "submit" else argv, "entry": entry,
            "out": str(log) if log else None, "err": str(err) if err else None, "env": env}))

    @staticmethod
    def running(pid: int) -> bool:
        """Whether the command ``pid`` still runs (not ended, nor a zombie not waited for)."""
        try:
            return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
        except OSError:
            return False

    def kill(self, pid: int) -> int:
        return self._ask("kill", pid)

    def wait(self, pid: int, timeout: float | None = None) -> int:
        """The exit status of the command ``pid`` (SIGKILLed after ``timeout`` seconds)."""
        import signal
        import threading

        timer = threading.Timer(timeout or 1e9, os.killpg, (pid, signal.SIGKILL))
        timer.start()
        try:
            return self._ask("wait", pid)
        finally:
            timer.cancel()

    def run(self, argv, log: Path | None = None) -> int:
        return self.wait(self.start(argv, log))

    def completed(self, argv, env: dict | None = None,
                  timeout: float | None = None) -> subprocess.CompletedProcess:
        """The command run to its end (SIGKILLed after ``timeout`` seconds): exit status,
        stdout and stderr, as subprocess.run gives them."""
        import tempfile

        with tempfile.TemporaryDirectory() as d:
            out, err = Path(d) / "out", Path(d) / "err"
            code = self.wait(self.start(argv, out, err=err, env=env), timeout)
            return subprocess.CompletedProcess(
                [str(a) for a in argv], code,
                out.read_text() if out.exists() else "", err.read_text() if err.exists() else "")

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
def submit(command_server):
    """``python -m magseg_hpc.submit train ARGS`` in a process of its own (forked from the
    command server, in the repository root): a CompletedProcess."""
    def run(*args, timeout: float = 240, env: dict | None = None):
        return command_server.completed(["submit", "train", *args], env=env, timeout=timeout)

    return run


@pytest.fixture
def cli(command_server):
    """``magseg-hpc ARGS`` in a process of its own, as a user runs it (forked from the
    command server: the same command line, exit status, stdout and stderr, without the
    seconds of a fresh interpreter's imports)."""
    def run(*args, cwd=None, timeout: float = 300):
        assert cwd is None, "the command server runs commands in the repository root"
        return command_server.completed(args, timeout=timeout)

    return run


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


def pytest_configure(config):
    config.addinivalue_line("markers", "without_slurm: run with sbatch and srun hidden from "
                            "PATH (the case is about a machine without SLURM)")
