"""``python -m magseg_hpc.submit train`` against the real local SLURM cluster (slurm/start.sh):
a 2-task DDP job past its time limit that requeues through submitit's checkpoint() and
resumes, and submissions SLURM refuses (a running job requeued: the two-node test). In CI
(env CI set) a missing cluster fails."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import TINY_MODEL_ARGS

from magseg_hpc.data.phantom import make_phantom, write_phantom

pytestmark = pytest.mark.slurm

REPO = Path(__file__).resolve().parents[1]
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
            "BOOT_FAIL", "DEADLINE", "PREEMPTED"}


@pytest.fixture(scope="module")
def phantom(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("phantom") / "phantom.zarr"
    write_phantom(path, make_phantom(shape=(24, 48, 48), seed=0))
    return path


@pytest.fixture
def jobs():
    """Job ids submitted by a test; cancelled afterwards so a failure leaves nothing queued."""
    ids: list[str] = []
    yield ids
    for job_id in ids:
        subprocess.run(["scancel", job_id], capture_output=True)


def tiny(phantom: Path, max_iters: int, checkpoint_every: int = 2) -> list[str]:
    """configs/cpu_tiny.yaml shrunk to seconds: 48 x 48 slices, 32 px crops, the tests' model."""
    return [f"data.volume={phantom}", "data.n_labeled=4", "data.n_val=4",
            "train.batch_size=2", "train.crop_size=32", "train.num_strong_augs=1",
            f"train.max_iters={max_iters}", f"train.checkpoint_every={checkpoint_every}",
            "train.eval_every=1000", "train.log_every=1", "train.threads=1", *TINY_MODEL_ARGS]


def submitted(result: subprocess.CompletedProcess, jobs: list) -> tuple[str, Path]:
    assert result.returncode == 0, result.stdout + result.stderr
    job_id = re.search(r"^submitted train job (\d+) ", result.stdout, re.M).group(1)
    jobs.append(job_id)
    run_dir = Path(re.search(r"^run dir:\s+(\S+)$", result.stdout, re.M).group(1))
    return job_id, run_dir


def job_state(job_id: str) -> str:
    lines = subprocess.run(["sacct", "-j", job_id, "-X", "-n", "-P", "-o", "State"],
                           capture_output=True, text=True).stdout.split("\n")
    lines = [line.split()[0] for line in lines if line.strip()]  # "CANCELLED by 0"
    return lines[-1] if lines else "UNKNOWN"


def wait_terminal(job_id: str, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = job_state(job_id)
        if state in TERMINAL:
            return state
        time.sleep(1)
    raise AssertionError(f"job {job_id} not finished after {timeout} s (state {state})")


def training_iterations(run_dir: Path) -> list[int]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["iteration"] for r in records if "loss" in r]  # evaluation records have no loss


def wait_for_iteration(run_dir: Path, job_id: str, iteration: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        metrics = run_dir / "metrics.jsonl"
        if metrics.is_file() and training_iterations(run_dir)[-1:] >= [iteration]:
            return
        assert job_state(job_id) not in TERMINAL, f"job {job_id} ended early"
        time.sleep(0.5)
    raise AssertionError(f"job {job_id} did not reach iteration {iteration} in {timeout} s")


def assert_continuous(run_dir: Path, max_iters: int, checkpoint_every: int) -> None:
    iters = training_iterations(run_dir)
    assert iters == sorted(set(iters)), f"iterations not strictly increasing: {iters}"
    gaps = [b - a for a, b in zip([0, *iters], iters, strict=False)]
    assert max(gaps) <= checkpoint_every, f"gap beyond the checkpoint interval: {iters}"
    assert iters[-1] == max_iters


def requeue_midway(run_dir: Path, job_id: str, at: int, max_iters: int,
                   every: int) -> tuple[str, int]:
    """Requeue the job once it has passed iteration ``at`` and let it complete into one
    continuous metrics file; rank 0's log and the iteration it says it resumed from."""
    wait_for_iteration(run_dir, job_id, at, timeout=150)
    subprocess.run(["scontrol", "requeue", job_id], check=True)
    assert wait_terminal(job_id, timeout=200) == "COMPLETED"
    assert_continuous(run_dir, max_iters, every)
    rank0 = (run_dir / "logs" / "rank0.log").read_text()
    resumed = re.findall(r"resumed from \S+ at iteration (\d+)", rank0)
    assert resumed, rank0[-1500:]
    return rank0, int(resumed[0])


def wait_for_log(path: Path, pattern: str, job_id: str, timeout: float) -> re.Match:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        match = re.search(pattern, path.read_text()) if path.is_file() else None
        if match:
            return match
        assert job_state(job_id) not in TERMINAL, f"job {job_id} ended early"
        time.sleep(0.5)
    raise AssertionError(f"{pattern!r} not in {path} after {timeout} s")


def test_time_limit_checkpoints_requeues_and_resumes(slurm_cluster, phantom, tmp_path, jobs,
                                                      submit):
    # A 1-minute limit, USR2 5 s before it; slurmctld checks limits every ~30 s and warns up
    # to one period early, so USR2 arrives 25-55 s after the start. The training is far
    # longer, so submitit calls TrainTask.checkpoint() and requeues the job, which resumes
    # from checkpoint.pt. Seen that, the test cancels it: finishing after a requeue is the
    # requeue test's part.
    profile = tmp_path / "short.yaml"
    profile.write_text("partition: debug\nnodes: 1\ngpus_per_node: 2\ncpus_per_task: 1\n"
                       "mem_gb: 2\ntimeout_min: 1\nsignal_delay_s: 5\nmax_num_timeout: 3\n")
    every = 2
    result = submit("--config", "configs/cpu_tiny.yaml", "--job", profile, "--runs-root",
                    tmp_path / "runs", "--name", "timeout", *tiny(phantom, 100000, every),
                    "train.epochs=100000")
    job_id, run_dir = submitted(result, jobs)
    rank0 = run_dir / "logs" / "rank0.log"
    wait_for_log(rank0, r"Caught signal SIGUSR2 .* timed-out", job_id, timeout=120)
    wait_for_log(rank0, r"requeue requested", job_id, timeout=10)  # TrainTask.checkpoint()
    wait_for_log(rank0, r"Requeued job \d+ \(2 remaining timeouts\)", job_id, timeout=10)
    resumed = int(wait_for_log(rank0, r"resumed from \S+ at iteration (\d+)", job_id,
                               timeout=90).group(1))
    assert resumed >= every  # from a checkpoint written before the time limit
    wait_for_iteration(run_dir, job_id, resumed + every, timeout=60)
    subprocess.run(["scancel", job_id], check=True)
    assert wait_terminal(job_id, timeout=60) == "CANCELLED"  # no writer left
    iters = training_iterations(run_dir)
    assert iters == list(range(1, iters[-1] + 1))  # one continuous metrics.jsonl
    states = subprocess.run(["sacct", "-j", job_id, "-X", "-D", "-n", "-P", "-o", "State"],
                            capture_output=True, text=True).stdout.splitlines()
    assert states[0] == "REQUEUED", states


@pytest.mark.parametrize("flags, reason", [
    (["--gpus-per-node", "3"], "Requested node configuration is not available"),
    (["--nodes", "3"], "Node count specification invalid"),  # the partition has 2
])
def test_slurm_refusal_is_one_readable_line(slurm_cluster, tmp_path, phantom, flags, reason,
                                            submit):
    result = submit("--config", "configs/cpu_tiny.yaml", "--job", "jobs/local.yaml", *flags,
                    "--runs-root", tmp_path / "runs", f"data.volume={phantom}")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert lines == [f"magseg-hpc: error: SLURM refused the train job: {reason}"], lines
    assert not any((tmp_path / "runs").glob("cpu_tiny/*"))  # no leftovers


def test_bad_submissions_fail_before_sbatch(slurm_cluster, tmp_path, submit):
    zero = submit("--config", "configs/cpu_tiny.yaml", "--job", "jobs/local.yaml",
                  "--gpus-per-node", "0", "--runs-root", tmp_path)
    assert zero.returncode == 2 and "--gpus-per-node 0 asks for no GPUs" in zero.stderr
    nodes = submit("--config", "configs/cpu_tiny.yaml", "--nodes", "0", "--runs-root", tmp_path)
    assert nodes.returncode == 2 and "nodes must be >= 1" in nodes.stderr
    profile = tmp_path / "typo.yaml"
    profile.write_text("partition: debug\ngpu_per_node: 2\n")
    typo = submit("--config", "configs/cpu_tiny.yaml", "--job", profile, "--runs-root", tmp_path)
    assert typo.returncode == 2
    assert "unknown key 'gpu_per_node'" in typo.stderr and "gpus_per_node=0" in typo.stderr
    # --cluster slurm on a machine without SLURM: sbatch hidden from PATH.
    env = {**os.environ, "PATH": os.path.dirname(sys.executable)}
    no_slurm = submit("--config", "configs/cpu_tiny.yaml", "--cluster", "slurm",
                      "--runs-root", tmp_path, env=env)
    assert no_slurm.returncode == 2
    assert "--cluster slurm but sbatch and srun not found on PATH" in no_slurm.stderr
    assert not any(tmp_path.glob("cpu_tiny/*"))


def test_submit_segment_and_evaluate_on_slurm(slurm_cluster, tmp_path, jobs, command_server):
    """segment-volume as a SLURM job gives the labels of a direct run; evaluate on them
    writes a report (the direct run as truth, so mIoU is 1)."""
    from magseg_hpc.cli import main as cli_main

    sys.path.insert(0, str(Path(__file__).parent))
    from segment_utils import make_checkpoint, make_volume, read_labels, write_input

    ckpt = make_checkpoint(tmp_path / "model.pt")
    vol = write_input(tmp_path / "in.zarr", make_volume((6, 24, 20)), chunks=(3, 24, 20))
    direct = tmp_path / "direct.zarr"
    assert cli_main(["segment-volume", str(vol), str(direct), "--model", str(ckpt),
                     "--in-process", "--device", "cpu", "--dashboard-address", ":0"]) == 0
    runs, out, report = tmp_path / "runs", tmp_path / "job.zarr", tmp_path / "report.json"

    def submit_kind(kind: str, *command_args) -> subprocess.CompletedProcess:
        return command_server.completed(
            ["submit", kind, "--job", "jobs/local.yaml", "--runs-root", runs, "--wait", "--",
             *command_args], timeout=120)

    seg = submit_kind("segment", vol, out, "--model", ckpt, "--in-process", "--device", "cpu",
                      "--dashboard-address", ":0")
    assert seg.returncode == 0, seg.stdout + seg.stderr
    job_id = re.search(r"^submitted segment job (\d+) \(slurm: 1 node\(s\) x 1 task\(s\), "
                       r"1 GPU\(s\) per node\)", seg.stdout, re.M).group(1)
    jobs.append(job_id)
    assert (read_labels(out) == read_labels(direct)).all()
    log = (runs / "segment" / job_id / "logs" / "rank0.log").read_text()
    assert f"magseg-hpc segment-volume {vol} {out}" in log

    ev = submit_kind("evaluate", out, direct, "--report", report)
    assert ev.returncode == 0, ev.stdout + ev.stderr
    jobs.append(re.search(r"^submitted evaluate job (\d+) ", ev.stdout, re.M).group(1))
    assert json.loads(report.read_text())["miou"] == 1.0
