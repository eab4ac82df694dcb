"""The batch script of a SLURM submission, rendered without submitting (``--dry-run``).

submitit has no public call that renders its batch script, so this module renders it from
the same parameters (:func:`magseg_hpc.launch.resources.executor_parameters`), in submitit's
layout: sorted ``#SBATCH`` lines, the profile's setup lines, then ``srun`` running
``python -u -m submitit.core._submit FOLDER``. Two tests hold it to submitit's own output:
the golden file (``tests/golden/sbatch_train_2x2.txt``) and, on the development cluster, the
script SLURM really ran, byte for byte.
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Any

__all__ = ["sbatch_script"]

# submitit's generic parameter names -> sbatch's.
_RENAMES = {"name": "job_name", "timeout_min": "time", "mem_gb": "mem",
            "tasks_per_node": "ntasks_per_node"}
_NOT_SBATCH = ("setup", "signal_delay_s", "additional_parameters", "srun_args")


def _mem(mem_gb: float) -> str:
    return f"{int(mem_gb)}GB" if mem_gb == int(mem_gb) else f"{int(mem_gb * 1024)}MB"


def _flag(key: str, value: Any) -> str:
    key = key.replace("_", "-")
    return f"#SBATCH --{key}" if value is True else f"#SBATCH --{key}={shlex.quote(str(value))}"


def sbatch_script(params: dict[str, Any], folder: str | Path,
                  python: str | None = None) -> str:
    """The batch script submitit submits for ``params`` (``executor_parameters(...)``)."""
    native: dict[str, Any] = {"wckey": "submitit"}
    for key, value in params.items():
        if key.startswith("local_"):
            continue
        key = key[len("slurm_"):] if key.startswith("slurm_") else _RENAMES.get(key, key)
        native[key] = _mem(value) if key == "mem" else value
    folder = str(folder)
    stdout = f"{folder}/%j_%t_log.out"
    stderr = f"{folder}/%j_%t_log.err"
    flags = {k: v for k, v in native.items() if v is not None and k not in _NOT_SBATCH}
    flags["signal"] = f"USR2@{native.get('signal_delay_s', 90)}"
    flags["output"] = stdout.replace("%t", "0")
    flags["error"] = stderr.replace("%t", "0")
    flags["open-mode"] = "append"
    flags.update(native.get("additional_parameters") or {})
    lines = ["#!/bin/bash", "", "# Parameters", *(_flag(k, flags[k]) for k in sorted(flags))]
    if native.get("setup"):
        lines += ["", "# setup", *native["setup"]]
    python = python or shlex.quote(sys.executable)
    srun = shlex.join(["srun", "--unbuffered", "--output", stdout, "--error", stderr,
                       *(native.get("srun_args") or [])])
    lines += ["", "# command", "export SUBMITIT_EXECUTOR=slurm",
              f"{srun} {python} -u -m submitit.core._submit {shlex.quote(folder)}", ""]
    return "\n".join(lines)
