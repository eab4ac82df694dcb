"""``python -m magseg_hpc.submit``: the entry point of the launcher.

The command line lives in :mod:`magseg_hpc.commands.submit`, the launcher in
:mod:`magseg_hpc.launch` (profiles, parameters, batch script, tasks, submission). The names
below are re-exported for code written against the former single module.
"""

from __future__ import annotations

import sys

from magseg_hpc.commands.submit import build_parser, check_command_args, main, register
from magseg_hpc.launch.jobs import SegmentSpec, TrainSpec
from magseg_hpc.launch.profile import JobProfile, job_profile_from_dict, load_job_profile
from magseg_hpc.launch.resources import CLUSTERS, executor_parameters, resolve_cluster
from magseg_hpc.launch.sbatch import sbatch_script
from magseg_hpc.launch.submission import Submission, submit_callable
from magseg_hpc.launch.tasks import Task, one_gpu_per_process
from magseg_hpc.rundir import check_run_folder

__all__ = [
    "CLUSTERS", "JobProfile", "job_profile_from_dict", "load_job_profile", "resolve_cluster",
    "executor_parameters", "sbatch_script", "Task", "TrainSpec", "SegmentSpec",
    "one_gpu_per_process",
    "check_run_folder", "Submission", "submit_callable", "register", "build_parser",
    "check_command_args", "main",
]

if __name__ == "__main__":
    sys.exit(main())
