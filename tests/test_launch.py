"""The launcher's pure parts: one GPU per process, CPUs per process, the batch script rendered
without submitit's internals (checked against submitit's own renderer), one profile schema."""

from __future__ import annotations

import os

import pytest

from magseg_hpc.cpus import process_cpus
from magseg_hpc.errors import MagsegError
from magseg_hpc.launch.dask_cluster import slurm_cluster_kwargs
from magseg_hpc.launch.profile import JobProfile, dask_jobqueue_kwargs, job_profile_from_dict
from magseg_hpc.launch.resources import executor_parameters
from magseg_hpc.launch.sbatch import sbatch_script
from magseg_hpc.launch.tasks import one_gpu_per_process


@pytest.mark.parametrize("visible, local_rank, local_world, expected", [
    ("0,1", 1, 2, "1"),
    ("2,3", 0, 2, "2"),      # SLURM's indices, not the local rank
    ("4", 0, 1, None),       # already one GPU per task
    (None, 0, 2, None),      # CPU nodes
    ("0,1,2,3", 1, 2, None),  # not one per task: left alone
])
def test_one_gpu_per_process(monkeypatch, visible, local_rank, local_world, expected):
    monkeypatch.delenv("MAGSEG_GPU_PER_PROCESS", raising=False)
    if visible is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    assert one_gpu_per_process(local_rank, local_world) == expected
    if expected is not None:
        assert os.environ["CUDA_VISIBLE_DEVICES"] == expected
        assert os.environ["MAGSEG_GPU_PER_PROCESS"] == "1"
    else:
        assert os.environ.get("CUDA_VISIBLE_DEVICES") == visible


def test_process_cpus_from_allocation(monkeypatch):
    cores = len(os.sched_getaffinity(0))
    monkeypatch.delenv("SLURM_CPUS_PER_TASK", raising=False)
    assert process_cpus(1) == cores
    assert process_cpus(cores * 4) == 1
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "1")
    assert process_cpus(1) == 1
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", str(cores * 64))  # capped by the affinity mask
    assert process_cpus(1) == cores


@pytest.mark.parametrize("profile, flags", [
    (JobProfile(partition="gpu", nodes=2, gpus_per_node=4, cpus_per_task=8, mem_gb=64.5,
                qos="high prio", setup=["module load cuda"],
                sbatch_extra={"exclusive": True, "mail-type": "END"}), {}),
    (JobProfile(tasks_per_node=3, account="a1", constraint="cpu"), {"nodes": 2}),
])
def test_sbatch_script_equals_submitits_own(profile, flags):
    from submitit.slurm.slurm import _make_sbatch_string  # private: only to hold ours to it

    params = executor_parameters(profile, cluster="slurm", name="x y", **flags)
    native = {"job_name": params["name"], "nodes": params["nodes"],
              "ntasks_per_node": params["tasks_per_node"], "cpus_per_task":
              params["cpus_per_task"], "time": params["timeout_min"],
              "gpus_per_node": params["gpus_per_node"]}
    if "mem_gb" in params:
        mem = params["mem_gb"]
        native["mem"] = f"{int(mem)}GB" if mem == int(mem) else f"{int(mem * 1024)}MB"
    native.update({k[len("slurm_"):]: v for k, v in params.items() if k.startswith("slurm_")})
    folder = "/runs/x/%j"
    command = f"/py -u -m submitit.core._submit {folder}"
    assert sbatch_script(params, folder, python="/py") == _make_sbatch_string(
        command=command, folder=folder, **native)


def test_one_profile_schema_for_dask_jobqueue():
    profile = job_profile_from_dict({"partition": "debug", "gpus_per_node": 2,
                                     "cpus_per_task": 3, "mem_gb": 8, "timeout_min": 90})
    kw = dask_jobqueue_kwargs(profile, ":0")
    assert kw["processes"] == 2 and kw["cores"] == 6 and kw["memory"] == "8GB"
    # Keys outside the schema (the old dask-only "cores", "memory") are refused, not ignored.
    for dead in ({"cores": 4}, {"memory": "8GB"}, {"gpus": 1}):
        with pytest.raises(MagsegError, match="unknown key"):
            slurm_cluster_kwargs(dead, ":0")
