"""submit without a SLURM cluster: job profiles, the pure parameter function, the dry-run
batch script (golden file), bad input, and a real 2-process run on submitit's local executor."""

from __future__ import annotations

import json
import os
import pickle
import re
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import yaml
from conftest import TINY_MODEL_ARGS

from magseg_hpc.commands.submit import check_command_args
from magseg_hpc.config import config_to_dict, load_config
from magseg_hpc.errors import MagsegError
from magseg_hpc.launch.jobs import evaluate_job, segment_job
from magseg_hpc.launch.profile import JobProfile, load_job_profile
from magseg_hpc.launch.resources import executor_parameters, resolve_cluster
from magseg_hpc.launch.tasks import Task
from magseg_hpc.rundir import check_run_folder
from magseg_hpc.submit import main

REPO = Path(__file__).resolve().parents[1]
GOLDEN = REPO / "tests" / "golden" / "sbatch_train_2x2.txt"


@pytest.fixture
def run_submit(command_server):
    """``python -m magseg_hpc.submit ARGS`` in a process of its own (forked from the command
    server, in the repository root): a CompletedProcess."""
    def run(*args, env: dict | None = None, timeout: float = 120):
        return command_server.completed(["submit", *args], env=env, timeout=timeout)

    return run


# --- job profiles ----------------------------------------------------------------------------


def test_shipped_profiles_load_typed():
    cluster = load_job_profile(REPO / "jobs" / "cluster_2gpu.yaml")
    assert (cluster.partition, cluster.nodes, cluster.gpus_per_node) == ("gpu", 2, 2)
    assert cluster.cpus_per_task == 8 and isinstance(cluster.mem_gb, float)
    assert cluster.account is None and cluster.setup  # placeholders and setup lines
    local = load_job_profile(REPO / "jobs" / "local.yaml")
    assert (local.partition, local.nodes, local.gpus_per_node) == ("debug", 1, 2)


def test_profile_by_bare_name(monkeypatch):
    monkeypatch.chdir(REPO)
    assert load_job_profile("local").partition == "debug"


def test_unknown_profile_key_names_valid_keys(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("partition: gpu\ngpus: 2\n")
    with pytest.raises(MagsegError) as e:
        load_job_profile(bad)
    assert "'gpus'" in str(e.value) and "gpus_per_node=0" in str(e.value)
    assert "timeout_min=60" in str(e.value)


@pytest.mark.parametrize("text, key", [
    ("nodes: two\n", "nodes"),
    ("mem_gb: lots\n", "mem_gb"),
    ("setup: module load cuda\n", "setup"),
    ("gpus_per_node: true\n", "gpus_per_node"),
])
def test_wrong_profile_types_are_refused(tmp_path, text, key):
    bad = tmp_path / "bad.yaml"
    bad.write_text(text)
    with pytest.raises(MagsegError, match=rf"{key} must be"):
        load_job_profile(bad)


def test_missing_profile_is_one_line_error(tmp_path):
    with pytest.raises(MagsegError, match="cannot read job profile"):
        load_job_profile(tmp_path / "nope.yaml")


# --- the pure parameter function -------------------------------------------------------------


def test_two_nodes_two_gpus_one_task_per_gpu():
    params = executor_parameters(load_job_profile(REPO / "jobs" / "cluster_2gpu.yaml"),
                                 cluster="slurm", name="run")
    assert params["nodes"] == 2 and params["gpus_per_node"] == 2
    assert params["tasks_per_node"] == 2  # one DDP process per GPU
    assert params["slurm_partition"] == "gpu" and params["slurm_signal_delay_s"] == 120
    assert "slurm_account" not in params  # null placeholders are not sent to sbatch
    assert params["mem_gb"] == 64.0 and params["cpus_per_task"] == 8


def test_flags_override_profile():
    profile = JobProfile(partition="gpu", nodes=2, gpus_per_node=2, account="proj",
                         sbatch_extra={"exclusive": True})
    params = executor_parameters(profile, cluster="slurm", name="r", nodes=4, gpus_per_node=4)
    assert (params["nodes"], params["gpus_per_node"], params["tasks_per_node"]) == (4, 4, 4)
    assert params["slurm_account"] == "proj"
    assert params["slurm_additional_parameters"] == {"exclusive": True}


def test_cpu_only_tasks_per_node_sets_processes():
    params = executor_parameters(JobProfile(), cluster="local", name="r", tasks_per_node=3)
    assert params["tasks_per_node"] == 3 and params["gpus_per_node"] == 0
    assert not any(k.startswith("slurm_") for k in params)
    assert executor_parameters(JobProfile(), cluster="local", name="r")["tasks_per_node"] == 1


@pytest.mark.parametrize("kwargs, match", [
    ({"nodes": 0}, "nodes must be >= 1"),
    ({"gpus_per_node": 0}, "--gpus-per-node 0"),
    ({"gpus_per_node": -1}, "gpus per node must be >= 0"),
    ({"gpus_per_node": 2, "tasks_per_node": 3}, "one process per GPU"),
    ({"tasks_per_node": 0}, "tasks per node must be >= 1"),
])
def test_impossible_requests_fail_before_submission(kwargs, match):
    with pytest.raises(MagsegError, match=match):
        executor_parameters(JobProfile(), cluster="slurm", name="r", **kwargs)


def test_local_and_debug_clusters_are_one_node():
    with pytest.raises(MagsegError, match="nodes must be 1"):
        executor_parameters(JobProfile(), cluster="local", name="r", nodes=2)
    with pytest.raises(MagsegError, match="use --cluster local"):
        executor_parameters(JobProfile(), cluster="debug", name="r", tasks_per_node=2)


def test_cluster_slurm_without_sbatch_is_refused(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # nothing on PATH
    with pytest.raises(MagsegError, match="sbatch and srun not found"):
        resolve_cluster("slurm")
    assert resolve_cluster("auto") == "local"
    with pytest.raises(MagsegError, match="unknown cluster"):
        resolve_cluster("pbs")


# --- dry run ---------------------------------------------------------------------------------


def normalise_script(text: str, runs_root: Path) -> str:
    return text.replace(str(runs_root), "<RUNS>").replace(sys.executable, "<PYTHON>")


def test_dry_run_matches_golden_sbatch_script(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    runs = tmp_path / "runs"
    code = main(["train", "--config", "configs/cpu_tiny.yaml", "--job", "jobs/cluster_2gpu.yaml",
                 "--runs-root", str(runs), "--dry-run", "train.max_iters=10"])
    assert code == 0
    script = normalise_script(capsys.readouterr().out, runs)
    if os.environ.get("UPDATE_GOLDEN"):
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(script)
    assert script == GOLDEN.read_text()
    assert not runs.exists()  # a dry run writes nothing


def test_dry_run_flags_reach_the_script(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    code = main(["train", "--config", "configs/cpu_tiny.yaml", "--job", "jobs/cluster_2gpu.yaml",
                 "--nodes", "3", "--gpus-per-node", "4", "--name", "big",
                 "--output-dir", str(tmp_path / "out"), "--dry-run"])
    out = capsys.readouterr().out
    assert code == 0
    assert "#SBATCH --nodes=3\n" in out and "#SBATCH --ntasks-per-node=4\n" in out
    assert "#SBATCH --gpus-per-node=4\n" in out and "#SBATCH --job-name=big\n" in out
    assert f"--output={tmp_path / 'out'}/%j_0_log.out" in out  # --output-dir used exactly


# --- submit segment / submit evaluate (pure and dry-run parts) --------------------------------


@pytest.fixture
def seg_inputs(tmp_path):
    """Paths that exist (the dry run checks existence only, not contents)."""
    (tmp_path / "in.zarr").mkdir()
    (tmp_path / "model.pt").write_bytes(b"")
    return tmp_path / "in.zarr", tmp_path / "out.zarr", tmp_path / "model.pt"


def test_segment_dry_run_script_holds_the_command(tmp_path, capsys, monkeypatch, seg_inputs):
    monkeypatch.chdir(REPO)
    vol, out, ckpt = seg_inputs
    runs = tmp_path / "runs"
    code = main(["segment", "--job", "jobs/cluster_2gpu.yaml", "--runs-root", str(runs),
                 "--dry-run", "--", str(vol), str(out), "--model", str(ckpt), "--tta"])
    script = capsys.readouterr().out
    assert code == 0
    assert f"# magseg-hpc job: magseg-hpc segment-volume {vol} {out} --model {ckpt} --tta\n" \
        in script
    # One task on one node with one GPU, whatever the profile says (2 nodes x 2 GPUs).
    assert "#SBATCH --nodes=1\n" in script and "#SBATCH --ntasks-per-node=1\n" in script
    assert "#SBATCH --gpus-per-node=1\n" in script and "#SBATCH --partition=gpu\n" in script
    assert "#SBATCH --job-name=segment\n" in script
    assert f"--output={runs}/segment/%j/%j_0_log.out" in script
    assert not runs.exists()


def test_evaluate_dry_run_uses_no_gpu(tmp_path, capsys, monkeypatch, seg_inputs):
    monkeypatch.chdir(REPO)
    vol = seg_inputs[0]
    code = main(["evaluate", "--job", "local", "--name", "ev", "--output-dir",
                 str(tmp_path / "ev"), "--dry-run", "--", str(vol), str(vol), "--report",
                 "r.json"])
    script = capsys.readouterr().out
    assert code == 0
    assert f"# magseg-hpc job: magseg-hpc evaluate {vol} {vol} --report r.json\n" in script
    assert "#SBATCH --gpus-per-node=0\n" in script and "#SBATCH --ntasks-per-node=1\n" in script
    assert f"--output={tmp_path / 'ev'}/%j_0_log.out" in script


@pytest.mark.parametrize("argv, message", [
    (["segment", "--dry-run", "--", "{d}/missing.zarr", "{d}/o.zarr", "--model", "{d}/model.pt"],
     "input volume {d}/missing.zarr does not exist"),
    (["segment", "--dry-run", "--", "{d}/in.zarr", "{d}/o.zarr", "--model", "{d}/nope.pt"],
     "--model checkpoint {d}/nope.pt does not exist"),
    (["evaluate", "--dry-run", "--", "{d}/in.zarr", "{d}/truth.zarr"],
     "TRUTH {d}/truth.zarr does not exist"),
    (["evaluate", "--dry-run", "--", "{d}/in.zarr", "{d}/in.zarr", "--bogus"],
     "magseg-hpc evaluate: unrecognized arguments: --bogus"),
    (["segment", "--dry-run", "--"], "no segment-volume arguments"),
    (["segment", "--dry-run", "--nodes", "2", "--", "{d}/in.zarr", "{d}/o.zarr", "--model",
      "{d}/model.pt"], "runs one task on one node, got --nodes 2"),
    # every check of SegmentOptions that needs no data runs at submission, as the job's would
    (["segment", "--dry-run", "--", "{d}/in.zarr", "{d}/o.zarr"], "--model CKPT is required"),
    (["segment", "--dry-run", "--", "{d}/in.zarr", "{d}/o.zarr", "--model", "{d}/model.pt",
      "--axes", "z,w"], "unknown axis 'w'"),
])
def test_bad_command_input_fails_at_submit_time(tmp_path, capsys, seg_inputs, argv, message):
    code = main([a.format(d=tmp_path) for a in argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert message.format(d=tmp_path) in err[0]


def test_refused_submission_leaves_no_runs_folder(tmp_path, capsys, monkeypatch, seg_inputs):
    """SLURM refuses the job (a fake sbatch here): one line with its reason, and the
    runs/<name>/ made for the job is gone again (nothing was there before)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in (("sbatch", "echo 'sbatch: error: Batch job submission failed: Invalid "
                                  "partition name specified' >&2; exit 1"), ("srun", "exit 0")):
        (bin_dir / name).write_text(f"#!/bin/sh\n{body}\n")
        (bin_dir / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    vol, out, ckpt = seg_inputs
    runs = tmp_path / "runs"
    code = main(["segment", "--cluster", "slurm", "--runs-root", str(runs), "--", str(vol),
                 str(out), "--model", str(ckpt)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert "SLURM refused the segment job: Invalid partition name specified" in err[0]
    assert not runs.exists()


def test_requeued_task_resumes_segment_and_reruns_evaluate(seg_inputs):
    # The specs the submit command builds, from the commands' own parsers.
    vol, out, ckpt = map(str, seg_inputs)
    _, seg_spec = check_command_args("segment-volume", [vol, out, "--model", ckpt, "--tta"])
    assert seg_spec.options.tta and not seg_spec.options.resume
    assert seg_spec.options.command_line == f"magseg-hpc segment-volume {vol} {out} " \
        f"--model {ckpt} --tta"
    seg = Task(segment_job, seg_spec, "runs/x/%j", "/tmp")
    again = pickle.loads(pickle.dumps(seg.checkpoint().function))  # as submitit sends it
    assert (again.function, again.run_dir, again.cwd) == (segment_job, seg.run_dir, "/tmp")
    assert again.spec == seg_spec.resumed() and again.spec.options.resume
    assert again.spec.options.tta and again.spec.cluster == seg_spec.cluster
    assert again.checkpoint().function.spec == again.spec  # resumed once is resumed
    overwriting = replace(seg_spec.options, overwrite=True)
    assert overwriting.resumed() == replace(seg_spec.options, resume=True)  # never both
    _, ev_spec = check_command_args("evaluate", [vol, vol, "--ignore", "none"])
    ev = Task(evaluate_job, ev_spec, "runs/x/%j", "/tmp")
    assert ev_spec.ignore is None and ev.checkpoint().function.spec == ev_spec


# --- bad input at submit time (no job is submitted) ------------------------------------------


def test_unknown_config_key_fails_at_submit_time(tmp_path, run_submit):
    result = run_submit("train", "--config", "configs/cpu_tiny.yaml", "--cluster", "local",
                        "--runs-root", tmp_path, "train.max_itres=5")
    assert result.returncode == 2
    assert "magseg-hpc: error: unknown config key 'train.max_itres'" in result.stderr
    assert "max_iters=None" in result.stderr
    assert not (tmp_path / "cpu_tiny").exists()


def test_missing_config_and_profile(tmp_path, run_submit):
    result = run_submit("train", "--config", tmp_path / "none.yaml", "--dry-run")
    assert result.returncode == 2 and "cannot read config" in result.stderr
    result = run_submit("train", "--config", "configs/cpu_tiny.yaml", "--job",
                        tmp_path / "none.yaml", "--dry-run")
    assert result.returncode == 2 and "cannot read job profile" in result.stderr


def test_output_dir_with_another_experiment_is_refused(tmp_path, run_submit):
    cfg = load_config(REPO / "configs" / "cpu_tiny.yaml")
    out = tmp_path / "out"
    out.mkdir()
    (out / "checkpoint.pt").write_bytes(b"")  # a run that got going: its config binds
    other = config_to_dict(cfg)
    other["train"]["lr"] = 0.5
    (out / "config.yaml").write_text(yaml.safe_dump(other))
    with pytest.raises(MagsegError, match=r"another experiment \(config differs in train.lr\)"):
        check_run_folder(out, config_to_dict(cfg))
    # runtime keys may change: the same experiment with a new max_iters resumes
    same = config_to_dict(cfg)
    same["train"]["max_iters"] = 99
    (out / "config.yaml").write_text(yaml.safe_dump(same))
    check_run_folder(out, config_to_dict(cfg))
    result = run_submit("train", "--config", "configs/cpu_tiny.yaml", "--cluster", "local",
                        "--output-dir", out, "train.lr=0.2")
    assert result.returncode == 2 and "holds another experiment" in result.stderr


# --- a real run on submitit's local executor (two processes, DDP over gloo) -----------------


@pytest.fixture(scope="module")
def phantom(tmp_path_factory) -> Path:
    from magseg_hpc.data.phantom import make_phantom, write_phantom

    path = tmp_path_factory.mktemp("phantom") / "phantom.zarr"
    write_phantom(path, make_phantom(shape=(24, 48, 48), seed=0))
    return path


def tiny_overrides(phantom: Path, max_iters: int, checkpoint_every: int = 2) -> list[str]:
    """configs/cpu_tiny.yaml shrunk to seconds: 48 x 48 slices, 32 px crops, the tests' model."""
    return [f"data.volume={phantom}", "data.n_labeled=4", "data.n_val=4",
            "train.batch_size=2", "train.crop_size=32", "train.num_strong_augs=1",
            f"train.max_iters={max_iters}", f"train.checkpoint_every={checkpoint_every}",
            "train.eval_every=1000", "train.log_every=1", "train.threads=1", *TINY_MODEL_ARGS]


def test_local_executor_runs_two_process_ddp_ending_with_identical_weights(tmp_path, phantom,
                                                                          run_submit):
    """Two processes (RANK, WORLD_SIZE as torchrun sets them) on submitit's local executor,
    DDP over gloo: both ranks end with the same weights and the same all-reduced
    validation, and the checkpoint records the world size."""
    # Only the venv on PATH: no sbatch, so the automatic choice is the local executor.
    env = {**os.environ, "PATH": os.path.dirname(sys.executable)}
    result = run_submit("train", "--config", "configs/cpu_tiny.yaml", "--tasks-per-node", "2",
                        "--runs-root", tmp_path / "runs", "--name", "local2", "--wait",
                        *tiny_overrides(phantom, 4), "train.eval_every=4", env=env,
                        timeout=240)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "(local: 1 node(s) x 2 task(s), CPU)" in result.stdout
    job_id = re.search(r"submitted train job (\S+)", result.stdout).group(1)
    run_dir = tmp_path / "runs" / "local2" / job_id
    assert f"run dir:  {run_dir}" in result.stdout
    summary = json.loads(result.stdout.split("rank 0 result: ", 1)[1])
    assert summary["world_size"] == 2 and summary["iterations"] == 4
    assert summary["iterations_per_epoch"] == 4  # 16 unlabelled // (2 per rank x 2 ranks)
    ranks = []
    for rank in (0, 1):
        text = (run_dir / "logs" / f"rank{rank}.log").read_text()
        line = [ln for ln in text.splitlines() if f"rank {rank} finished: " in ln][-1]
        ranks.append(json.loads(line.split("finished: ", 1)[1]))
    for key in ("student_digest", "teacher_digest", "last_eval"):  # evaluation all-reduced
        assert ranks[0][key] == ranks[1][key] is not None, key
    ckpt = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    assert ckpt["train_state"]["world_size"] == 2 and ckpt["train_state"]["iteration"] == 4
    assert (run_dir / "config.yaml").is_file()
