"""Multi-node training on the two-node development cluster (slurm/start.sh: nodes n1 and n2,
each slurmd in its own network and UTS namespace, 2 fake GPUs each). In CI a missing cluster,
or one with fewer than two nodes, fails these tests."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from test_submit_slurm import (
    TERMINAL,
    job_state,
    requeue_midway,
    submitted,
    tiny,
    training_iterations,
    wait_terminal,
)

from magseg_hpc.models import build_model
from magseg_hpc.train.records import state_digest

pytestmark = pytest.mark.slurm

RANK_LINE = re.compile(
    r"job (?P<job>\d+) on (?P<host>\S+): rank (?P<rank>\d+) of (?P<world>\d+) "
    r"\(local rank (?P<local>\d+) of (?P<local_world>\d+), node (?P<node>\d+) of (?P<nodes>\d+)\), "
    r"CUDA_VISIBLE_DEVICES=(?P<gpu>\S+), master (?P<master>[^:]+):")


@pytest.fixture(scope="module")
def phantom(tmp_path_factory) -> Path:
    from magseg_hpc.data.phantom import make_phantom, write_phantom

    path = tmp_path_factory.mktemp("phantom") / "phantom.zarr"
    write_phantom(path, make_phantom(shape=(24, 48, 48), seed=0))
    return path


@pytest.fixture
def jobs():
    ids: list[str] = []
    yield ids
    for job_id in ids:
        subprocess.run(["scancel", job_id], capture_output=True)


def rank_starts(run_dir: Path, world: int) -> dict[int, dict]:
    """Each rank's last start line (host, local rank, GPU, master) and its result."""
    import json

    ranks = {}
    for rank in range(world):
        text = (run_dir / "logs" / f"rank{rank}.log").read_text()
        starts = [m.groupdict() for m in RANK_LINE.finditer(text)]
        assert starts, f"no start line in rank{rank}.log:\n{text[-2000:]}"
        finished = [ln for ln in text.splitlines() if f"rank {rank} finished: " in ln]
        result = json.loads(finished[-1].split("finished: ", 1)[1]) if finished else None
        binds = re.findall(r"bind (\S+)", text)
        ranks[rank] = {**starts[-1], "result": result, "bind": binds[-1] if binds else None}
    return ranks


def sacct_field(job_id: str, field: str) -> str:
    return subprocess.run(["sacct", "-j", job_id, "-X", "-n", "-P", "-o", field],
                          capture_output=True, text=True).stdout.strip().splitlines()[-1]


def assert_two_nodes_same_weights(ranks: dict[int, dict], gpus: bool, iterations: int) -> None:
    world = len(ranks)
    assert sorted(ranks) == list(range(world))
    assert {int(r["world"]) for r in ranks.values()} == {world}
    hosts = {r["host"] for r in ranks.values()}
    assert len(hosts) == 2, hosts  # distinct host names: two nodes
    for host in hosts:
        on_host = [r for r in ranks.values() if r["host"] == host]
        assert sorted(int(r["local"]) for r in on_host) == list(range(world // 2))
        assert len({r["node"] for r in on_host}) == 1
        if gpus:  # one GPU index per process, the node's local_rank-th
            assert sorted(r["gpu"] for r in on_host) == [str(i) for i in range(world // 2)]
            assert all(r["gpu"] == r["local"] for r in on_host)
        else:
            assert all(r["gpu"] == "-" for r in on_host)
    # MASTER_ADDR is the first node; gloo bound to each node's own address, not loopback.
    assert {r["master"] for r in ranks.values()} == {ranks[0]["host"]}
    for r in ranks.values():
        assert r["bind"] and not r["bind"].startswith("127."), r
    digests = {(r["result"]["student_digest"], r["result"]["teacher_digest"])
               for r in ranks.values()}
    assert len(digests) == 1, digests  # identical weights on all ranks
    assert {r["result"]["iterations"] for r in ranks.values()} == {iterations}


def test_two_cpu_nodes_tasks_per_node_flag_over_profile(two_nodes, phantom, tmp_path, jobs,
                                                         submit):
    # The profile asks for 2 tasks on each of 2 CPU nodes; the flag makes it 1 per node
    # (2 ranks: the lighter job on 2 shared cores).
    profile = tmp_path / "cpu2.yaml"
    profile.write_text("partition: debug\nnodes: 2\ngpus_per_node: 0\ntasks_per_node: 2\n"
                       "cpus_per_task: 1\nmem_gb: 2\ntimeout_min: 10\n")
    result = submit("--config", "configs/cpu_tiny.yaml", "--job", profile,
                    "--tasks-per-node", "1", "--runs-root", tmp_path / "runs", "--name", "cpu",
                    *tiny(phantom, 2), "--wait")
    job_id, run_dir = submitted(result, jobs)
    assert "(slurm: 2 node(s) x 1 task(s), CPU)" in result.stdout
    assert wait_terminal(job_id, timeout=60) == "COMPLETED"
    assert_two_nodes_same_weights(rank_starts(run_dir, 2), gpus=False, iterations=2)
    assert "gres/gpu" not in sacct_field(job_id, "AllocTRES")


def test_two_nodes_two_gpus_four_ranks_requeued_resume_with_one_metrics_file(
        two_nodes, phantom, tmp_path, jobs, submit):
    """Two nodes x two GPUs: four ranks, one GPU each, placed and bound per node, identical
    weights, the ones rank 0's checkpoint holds; requeued, every rank runs again on two nodes
    and the run resumes from its checkpoint into one continuous metrics file; SLURM ran the
    batch script --dry-run prints. (One job for all of it: the four-rank start-up is the
    expensive part. A single-node DDP job is the time-limit test's.)"""
    max_iters, every = 10, 2
    runs = tmp_path / "runs"
    args = ["--config", "configs/cpu_tiny.yaml", "--job", "jobs/local.yaml", "--nodes", "2",
            "--gpus-per-node", "2", "--runs-root", runs, "--name", "requeue",
            *tiny(phantom, max_iters, every)]
    result = submit(*args)
    job_id, run_dir = submitted(result, jobs)
    assert run_dir == runs / "requeue" / job_id
    assert "tail -F " in result.stdout  # never blocks without --wait
    assert "(slurm: 2 node(s) x 2 task(s), 2 GPU(s) per node)" in result.stdout
    _, resumed = requeue_midway(run_dir, job_id, 3, max_iters, every)
    assert resumed >= every  # the checkpoint before the requeue, not zero
    for rank in range(4):  # every rank ran twice, the second time on two nodes again
        text = (run_dir / "logs" / f"rank{rank}.log").read_text()
        assert len(re.findall(rf"rank {rank} of 4 ", text)) >= 2, text[-1500:]
    # the last start: two nodes, a GPU per rank, identical weights at the end
    assert_two_nodes_same_weights(rank_starts(run_dir, 4), gpus=True, iterations=max_iters)
    assert "gres/gpu=4" in sacct_field(job_id, "AllocTRES")
    assert sacct_field(job_id, "NNodes") == "2"
    # The checkpoint (written by rank 0 only) holds the weights the last rank ended with.
    ckpt = torch.load(run_dir / "checkpoint.pt", weights_only=True, map_location="cpu")
    student = build_model(ckpt["model"])
    student.load_state_dict(ckpt["student"])
    assert state_digest(student) == rank_starts(run_dir, 4)[3]["result"]["student_digest"]
    # The batch script SLURM ran is the one --dry-run prints.
    dry = submit(*args, "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert (run_dir / f"{job_id}_submission.sh").read_text() == dry.stdout


def _task_pids(job_id: str, rank: int) -> list[int]:
    """Pids of the python processes running task ``rank`` of the job (any namespace)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if not (entry / "comm").read_text().startswith("python"):
                continue
            env = dict(item.split("=", 1) for item in
                       (entry / "environ").read_bytes().decode(errors="replace").split("\0")
                       if "=" in item)
        except OSError:
            continue
        if env.get("SLURM_JOB_ID") == job_id and env.get("SLURM_PROCID") == str(rank):
            pids.append(int(entry.name))
    return pids


def test_lost_node_fails_the_job_visibly_and_nothing_hangs(two_nodes, phantom, tmp_path,
                                                          jobs, command_server):
    # A long training; once it runs, the processes of rank 3 (on the second node) are killed
    # as a node crash would. The other ranks must fail their next collective (gloo sees the
    # closed connections; MAGSEG_DIST_TIMEOUT_S bounds a silent peer), SLURM ends the job,
    # and `submit --wait` says so in one line, all within a bounded time.
    env = {**os.environ, "MAGSEG_DIST_TIMEOUT_S": "30"}
    runs = tmp_path / "runs"
    args = ["--config", "configs/cpu_tiny.yaml", "--job", "jobs/local.yaml", "--nodes", "2",
            "--gpus-per-node", "2", "--runs-root", str(runs), "--name", "lost",
            *tiny(phantom, 100000, 1000), "train.epochs=100000", "--wait"]
    out_file, err_file = tmp_path / "submit.out", tmp_path / "submit.err"
    waiting = command_server.start(["submit", "train", *args], out_file, err=err_file, env=env)
    code = None
    try:
        deadline = time.monotonic() + 60
        job_id = None
        while job_id is None and time.monotonic() < deadline:
            dirs = list((runs / "lost").glob("[0-9]*")) if (runs / "lost").is_dir() else []
            job_id = dirs[0].name if dirs else None
            time.sleep(0.5)
        assert job_id, "no run dir appeared"
        jobs.append(job_id)
        run_dir = runs / "lost" / job_id
        # Once the process group is formed (the training has started on rank 0): the
        # other ranks are in, or about to enter, a collective with rank 3.
        rank0_log = run_dir / "logs" / "rank0.log"
        while "experiment cpu_tiny" not in (rank0_log.read_text() if rank0_log.is_file()
                                            else ""):
            assert job_state(job_id) not in TERMINAL and time.monotonic() < deadline + 120
            time.sleep(0.5)
        victims = _task_pids(job_id, 3)
        assert victims, "rank 3's process not found"
        host3 = RANK_LINE.search((run_dir / "logs" / "rank3.log").read_text())["host"]
        host0 = RANK_LINE.search((run_dir / "logs" / "rank0.log").read_text())["host"]
        assert host3 != host0
        started = time.monotonic()
        for pid in victims:
            os.kill(pid, signal.SIGKILL)
        code = command_server.wait(waiting, timeout=120)
        elapsed = time.monotonic() - started
    finally:
        if code is None:
            command_server.kill(waiting)
    out, err = out_file.read_text(), err_file.read_text()
    assert code == 1, out + err
    message = [ln for ln in err.splitlines() if ln.startswith("magseg-hpc: error:")]
    assert message and f"train job {job_id} failed" in message[-1], err[-3000:]
    assert elapsed < 90, elapsed
    state = wait_terminal(job_id, timeout=60)
    assert state in TERMINAL - {"COMPLETED"}, state
    assert job_state(job_id) != "RUNNING"
    assert not (run_dir / "metrics.jsonl").is_file() or training_iterations(run_dir)[-1] < 100
    for rank in range(4):  # no task process left on either node
        assert _task_pids(job_id, rank) == []
