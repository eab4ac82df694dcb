"""Submit training jobs to SLURM (or local processes) through submitit.

``python -m magseg_hpc.submit train --config FILE [--job jobs/PROFILE.yaml] ...``

This is the only module that talks to submitit. Launch is kept apart from work: the job runs
:class:`TrainTask`, a thin callable around :func:`magseg_hpc.train.run_training`, which runs
the same under torchrun or as one process. Where a job runs and with what resources comes
from a job profile (``jobs/*.yaml``, :class:`JobProfile`) and command-line flags, combined by
one pure function, :func:`executor_parameters`.

Run directory: ``runs/<name>/<job id>/`` holds submitit's files (batch script, pickles,
per-task stdout/stderr), the training outputs (``config.yaml``, ``checkpoint.pt``,
``metrics.jsonl``) and per-rank logs under ``logs/``. The job id is only known after
submission, so the folder is given to submitit as ``runs/<name>/%j`` and the task resolves
it from its job environment; a requeued job keeps its id and so resumes in the same dir.

Preemption and time limits: SLURM sends USR2 ``signal_delay_s`` before the limit (and
``scancel --signal=USR2`` preempts); submitit then calls :meth:`TrainTask.checkpoint`, which
requeues a fresh task. State lives on disk: every start resumes from ``checkpoint.pt`` when it
exists, which also covers a plain ``scontrol requeue`` that bypasses ``checkpoint()``.

``submit segment`` / ``submit evaluate`` run ``magseg-hpc segment-volume`` / ``evaluate`` as
one task on one node through :class:`CommandTask` (the argument list after the submit flags);
the job profiles, parameters, dry-run and error handling are those of ``submit train``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import importlib
import io
import json
import logging
import os
import re
import shlex
import shutil
import socket
import sys
import time
import typing
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import submitit
import yaml
from submitit.slurm.slurm import SlurmExecutor

from magseg_hpc.config import (
    config_from_dict,
    config_to_dict,
    experiment_differences,
    load_config,
    load_yaml,
)
from magseg_hpc.errors import MagsegError
from magseg_hpc.volume.io import volume_file

log = logging.getLogger(__name__)

__all__ = [
    "JobProfile",
    "load_job_profile",
    "resolve_cluster",
    "executor_parameters",
    "sbatch_script",
    "TrainTask",
    "CommandTask",
    "check_output_dir",
    "submit_callable",
    "register",
    "main",
]

CLUSTERS = ("slurm", "local", "debug")
SUBMISSION_FILE = "submission.json"


# --- job profiles ---------------------------------------------------------------------------


@dataclass
class JobProfile:
    """WHERE a job runs and with what resources (``jobs/*.yaml``); flags override it."""

    partition: str | None = None
    nodes: int = 1
    gpus_per_node: int = 0
    # DDP processes per node on CPU-only nodes; with GPUs it is always one per GPU.
    tasks_per_node: int | None = None
    cpus_per_task: int = 1
    mem_gb: float | None = None  # per node; null = the partition's default
    timeout_min: int = 60
    # USR2 arrives this long before the time limit: time to write a checkpoint and requeue.
    signal_delay_s: int = 90
    # Requeues after a time limit or preemption before submitit gives up.
    max_num_timeout: int = 3
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    # Other sbatch directives, e.g. {"exclusive": true, "mail-type": "END"}.
    sbatch_extra: dict[str, Any] = field(default_factory=dict)
    # Shell lines run in the batch script before srun (module load, conda activate).
    setup: list[str] = field(default_factory=list)


def _profile_help() -> str:
    return ", ".join(
        f"{f.name}={f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default!r}"  # noqa: E501
        for f in dataclasses.fields(JobProfile)
    )


def _check_type(key: str, value: Any, tp: Any) -> bool:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if value is None:
        return type(None) in args
    if args and type(None) in args:  # Optional[X]
        return any(_check_type(key, value, a) for a in args if a is not type(None))
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is str:
        return isinstance(value, str)
    if origin is list:
        return isinstance(value, list) and all(isinstance(v, str) for v in value)
    if origin is dict:
        return isinstance(value, dict) and all(isinstance(k, str) for k in value)
    raise TypeError(f"unsupported JobProfile annotation {tp!r}")  # pragma: no cover


def job_profile_from_dict(raw: Any, source: str = "job profile") -> JobProfile:
    """Validate a plain mapping into a :class:`JobProfile`, naming the valid keys on error."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise MagsegError(f"{source} must be a YAML mapping; valid keys: {_profile_help()}")
    hints = typing.get_type_hints(JobProfile)
    for key, value in raw.items():
        if key not in hints:
            raise MagsegError(
                f"unknown key {key!r} in {source}; valid keys (with defaults): {_profile_help()}"
            )
        if not _check_type(key, value, hints[key]):
            expected = str(hints[key]).replace("typing.", "")
            raise MagsegError(
                f"{source}: {key} must be {expected}, got {value!r}; "
                f"valid keys (with defaults): {_profile_help()}"
            )
    profile = JobProfile(**copy.deepcopy(raw))
    if profile.mem_gb is not None:
        profile.mem_gb = float(profile.mem_gb)
    for key in ("timeout_min", "cpus_per_task", "signal_delay_s"):
        if getattr(profile, key) < 1:
            raise MagsegError(f"{source}: {key} must be >= 1, got {getattr(profile, key)}")
    if profile.max_num_timeout < 0:
        raise MagsegError(f"{source}: max_num_timeout must be >= 0")
    return profile


def load_job_profile(path: str | Path | None) -> JobProfile:
    """Read ``jobs/*.yaml``; a bare name such as ``local`` means ``jobs/local.yaml``."""
    if path is None:
        return JobProfile()
    p = Path(path)
    if not p.exists() and p.suffix == "" and len(p.parts) == 1:
        p = Path("jobs") / f"{p.name}.yaml"
    try:
        text = p.read_text()
    except OSError as e:
        raise MagsegError(
            f"cannot read job profile {path}: {e.strerror}; see jobs/ for examples"
        ) from None
    try:
        raw = load_yaml(text)
    except yaml.YAMLError as e:
        text = " ".join(str(e).split())
        raise MagsegError(f"job profile {p} is not valid YAML: {text}") from None
    return job_profile_from_dict(raw, f"job profile {p}")


# --- parameters -----------------------------------------------------------------------------


def resolve_cluster(requested: str | None) -> str:
    """``slurm`` when sbatch is on PATH, else ``local``, unless ``requested`` says otherwise."""
    if requested not in (None, "auto", *CLUSTERS):
        raise MagsegError(f"unknown cluster {requested!r}; valid: auto, {', '.join(CLUSTERS)}")
    if requested in (None, "auto"):
        return "slurm" if shutil.which("sbatch") else "local"
    if requested == "slurm":
        missing = [cmd for cmd in ("sbatch", "srun") if shutil.which(cmd) is None]
        if missing:
            raise MagsegError(
                f"--cluster slurm but {' and '.join(missing)} not found on PATH; run on a SLURM "
                "login node (or load its module), or use --cluster local"
            )
    return requested


def executor_parameters(
    profile: JobProfile,
    *,
    cluster: str,
    name: str,
    nodes: int | None = None,
    gpus_per_node: int | None = None,
    tasks_per_node: int | None = None,
) -> dict[str, Any]:
    """submitit ``AutoExecutor.update_parameters`` keywords from a profile and flags.

    Pure: no cluster is contacted. One task per GPU; on CPU-only nodes (``gpus_per_node`` 0)
    ``tasks_per_node`` sets the number of DDP processes. Limits of the partition itself are
    SLURM's to check at submission.
    """
    if cluster not in CLUSTERS:
        raise MagsegError(f"unknown cluster {cluster!r}; valid: {', '.join(CLUSTERS)}")
    n_nodes = profile.nodes if nodes is None else nodes
    gpus = profile.gpus_per_node if gpus_per_node is None else gpus_per_node
    tasks = profile.tasks_per_node if tasks_per_node is None else tasks_per_node
    if n_nodes < 1:
        raise MagsegError(f"nodes must be >= 1, got {n_nodes}")
    if gpus < 0:
        raise MagsegError(f"gpus per node must be >= 0, got {gpus}")
    if gpus_per_node == 0 and tasks is None:
        raise MagsegError(
            "--gpus-per-node 0 asks for no GPUs: give --gpus-per-node >= 1 (one process per "
            "GPU), or --tasks-per-node N for N CPU processes per node"
        )
    if tasks is not None and tasks < 1:
        raise MagsegError(f"tasks per node must be >= 1, got {tasks}")
    if gpus > 0:
        if tasks_per_node is not None and tasks_per_node != gpus:
            raise MagsegError(
                f"--tasks-per-node {tasks_per_node} with {gpus} GPUs per node: training runs "
                "one process per GPU; leave --tasks-per-node out (it is for CPU-only nodes)"
            )
        tasks = gpus
    elif tasks is None:
        tasks = 1
    if cluster in ("local", "debug") and n_nodes > 1:
        raise MagsegError(
            f"--cluster {cluster} runs on this machine only: nodes must be 1, got {n_nodes}"
        )
    if cluster == "debug" and tasks > 1:
        raise MagsegError(
            f"--cluster debug runs one process in this one; got {tasks} tasks per node: "
            "use --cluster local for several processes"
        )
    params: dict[str, Any] = {
        "name": name,
        "nodes": n_nodes,
        "tasks_per_node": tasks,
        "gpus_per_node": gpus,
        "cpus_per_task": profile.cpus_per_task,
        "timeout_min": profile.timeout_min,
    }
    if profile.mem_gb is not None:
        params["mem_gb"] = profile.mem_gb
    if cluster == "slurm":
        params["slurm_signal_delay_s"] = profile.signal_delay_s
        for key in ("partition", "account", "qos", "constraint"):
            if getattr(profile, key) is not None:
                params[f"slurm_{key}"] = getattr(profile, key)
        if profile.setup:
            params["slurm_setup"] = list(profile.setup)
        if profile.sbatch_extra:
            params["slurm_additional_parameters"] = dict(profile.sbatch_extra)
    # submitit's AutoExecutor takes no signal delay for the local executor (it uses 30 s).
    return params


class _ScriptOnlySlurmExecutor(SlurmExecutor):
    """submitit's SLURM executor without its srun check, to render the batch script anywhere."""

    @classmethod
    def affinity(cls) -> int:
        return 1


def sbatch_script(params: dict[str, Any], folder: str | Path) -> str:
    """The batch script submitit would submit for ``params`` (see executor_parameters)."""
    from magseg_hpc.outputs import removing_new_folders

    with removing_new_folders(folder):  # the executor creates its folder: a dry run must not
        executor = _ScriptOnlySlurmExecutor(folder=folder)
    generic = {k: v for k, v in params.items() if not k.startswith(("slurm_", "local_"))}
    native = executor._convert_parameters(generic)  # the renames AutoExecutor applies
    native.update({k[len("slurm_"):]: v for k, v in params.items() if k.startswith("slurm_")})
    executor.update_parameters(**native)
    return executor._make_submission_file_text(executor._submitit_command_str, "dry-run")


# --- the task that runs inside the job ------------------------------------------------------


class _NotLoggedElsewhere(logging.Filter):
    """Drops package records that a handler on the ``magseg_hpc`` logger already writes to
    the same file (the training's own per-rank log), so no line appears twice."""

    def __init__(self, path: Path) -> None:
        super().__init__()
        self.path = str(path.absolute())

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.name.startswith("magseg_hpc"):
            return True
        return not any(getattr(h, "baseFilename", None) == self.path
                       for h in logging.getLogger("magseg_hpc").handlers)


def _setup_rank_logging(output_dir: Path, rank: int) -> None:
    """Every rank logs to ``logs/rank<R>.log`` and to its stderr (submitit's per-task file)."""
    path = output_dir / "logs" / f"rank{rank}.log"
    path.parent.mkdir(parents=True, exist_ok=True)
    fmt = logging.Formatter(f"%(asctime)s rank{rank} %(levelname)s %(name)s: %(message)s")
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, "_magseg_rank_handler", False):
            root.removeHandler(handler)
            handler.close()
    file_handler = logging.FileHandler(path)
    file_handler.addFilter(_NotLoggedElsewhere(path))
    for handler in (file_handler, logging.StreamHandler(sys.stderr)):
        handler.setFormatter(fmt)
        handler._magseg_rank_handler = True  # type: ignore[attr-defined]
        root.addHandler(handler)
    root.setLevel(logging.INFO)


class TrainTask:
    """The callable a training job runs: one instance per task (rank).

    Holds plain data only (the resolved config as a dict and the output dir), so the pickle
    stays small and readable by a later version; the work is :func:`run_training`.
    """

    def __init__(self, config: dict, output_dir: str, submission_id: str,
                 resume_any: bool = False,
                 entry_point: str = "magseg_hpc.train:run_training") -> None:
        self.config = config
        # May contain %j: replaced by the job id inside the job.
        self.output_dir = output_dir
        self.submission_id = submission_id
        # An explicit --output-dir may be resumed by any later submission.
        self.resume_any = resume_any
        # "module:function" taking (ExperimentConfig, output_dir) -> dict; imported in the job.
        self.entry_point = entry_point

    def resolve_output_dir(self, job_id: str) -> Path:
        return Path(self.output_dir.replace("%j", job_id))

    def _claim_output_dir(self, output_dir: Path, job_id: str, rank: int) -> None:
        """Refuse a run dir made by another submission (e.g. job ids reused after a reset)."""
        marker = output_dir / SUBMISSION_FILE
        if marker.exists():
            previous = json.loads(marker.read_text())
            if previous.get("submission_id") != self.submission_id and not self.resume_any:
                raise MagsegError(
                    f"run dir {output_dir} holds job {previous.get('job_id')} of another "
                    "submission (were SLURM job ids reset?); move it away and resubmit"
                )
        if rank == 0:
            record = {"submission_id": self.submission_id, "job_id": job_id,
                      "host": socket.gethostname(), "started": time.strftime("%FT%T%z")}
            tmp = marker.with_name(f".{marker.name}.tmp")
            tmp.write_text(json.dumps(record, indent=1) + "\n")
            tmp.replace(marker)

    def __call__(self) -> dict:
        env = submitit.JobEnvironment()
        # Keep CUDA_VISIBLE_DEVICES as SLURM set it: the training uses cuda:LOCAL_RANK.
        # overwrite: sbatch passes the submitting shell's MASTER_ADDR/RANK... on.
        dist_env = submitit.helpers.TorchDistributedEnvironment().export(
            set_cuda_visible_devices=False, overwrite=True
        )
        output_dir = self.resolve_output_dir(env.job_id)
        output_dir.mkdir(parents=True, exist_ok=True)
        _setup_rank_logging(output_dir, dist_env.rank)
        log.info("job %s on %s: rank %d of %d (local rank %d), master %s:%s, output %s",
                 env.job_id, env.hostname, dist_env.rank, dist_env.world_size,
                 dist_env.local_rank, dist_env.master_addr, dist_env.master_port, output_dir)
        self._claim_output_dir(output_dir, env.job_id, dist_env.rank)
        module, _, function = self.entry_point.partition(":")
        run_training = getattr(importlib.import_module(module), function)
        result = run_training(config_from_dict(self.config), output_dir)
        log.info("rank %d finished: %s", dist_env.rank, json.dumps(result, default=str))
        return result

    def checkpoint(self, *args: Any, **kwargs: Any) -> submitit.helpers.DelayedSubmission:
        """Called by submitit on preemption/time limit: requeue a fresh task.

        The training state is on disk (``checkpoint.pt``), so nothing from this instance but
        its constructor arguments is carried over.
        """
        log.info("requeue requested: the job will resume from its run dir's checkpoint.pt")
        fresh = TrainTask(self.config, self.output_dir, self.submission_id, self.resume_any,
                          self.entry_point)
        return submitit.helpers.DelayedSubmission(fresh)


class CommandTask:
    """The callable a ``submit segment`` / ``submit evaluate`` job runs: one ``magseg-hpc``
    command (``argv`` as after ``magseg-hpc``), in the directory it was submitted from.

    A non-zero exit raises, so the job fails visibly. On preemption or time limit
    ``checkpoint()`` requeues the same command, with ``--resume`` added for segment-volume
    (it continues from its done markers); other commands simply rerun.
    """

    def __init__(self, argv: Sequence[str], cwd: str, run_dir: str) -> None:
        self.argv = list(argv)
        self.cwd = cwd
        self.run_dir = run_dir  # may contain %j: replaced by the job id inside the job

    def __call__(self) -> dict:
        from magseg_hpc import cli

        env = submitit.JobEnvironment()
        run_dir = Path(self.run_dir.replace("%j", str(env.job_id)))
        _setup_rank_logging(run_dir, 0)
        os.chdir(self.cwd)  # relative paths mean what they meant at submission
        command = shlex.join(["magseg-hpc", *self.argv])
        log.info("job %s on %s: %s (in %s)", env.job_id, env.hostname, command, self.cwd)
        saved_argv = sys.argv
        sys.argv = ["magseg-hpc", *self.argv]  # provenance records the command line
        try:
            status = cli.main(self.argv)
        finally:
            sys.argv = saved_argv
        if status != 0:
            raise MagsegError(f"{command} exited with status {status}; "
                              f"see {run_dir / 'logs' / 'rank0.log'}")
        log.info("finished: %s", command)
        return {"command": command, "exit_status": status}

    def checkpoint(self, *args: Any, **kwargs: Any) -> submitit.helpers.DelayedSubmission:
        argv = list(self.argv)
        if argv[:1] == ["segment-volume"] and "--resume" not in argv:
            argv = [a for a in argv if a != "--overwrite"] + ["--resume"]
        log.info("requeue requested: rerunning %s", shlex.join(["magseg-hpc", *argv]))
        return submitit.helpers.DelayedSubmission(CommandTask(argv, self.cwd, self.run_dir))


# --- submission -----------------------------------------------------------------------------


def check_output_dir(output_dir: Path, config: dict) -> None:
    """Refuse, before submitting, an output dir that holds a different experiment."""
    saved = output_dir / "config.yaml"
    if not saved.exists() or not any((output_dir / f).is_file()
                                     for f in ("checkpoint.pt", "best.pt")):
        return  # no config, or a run that failed before its first checkpoint: nothing binds
    try:
        previous = yaml.safe_load(saved.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise MagsegError(f"cannot read {saved} ({e}); choose another --output-dir") from None
    if not isinstance(previous, dict):
        raise MagsegError(f"{saved} is not a config mapping; choose another --output-dir")
    differences = experiment_differences(previous, config)
    if differences:
        shown = ", ".join(differences[:8]) + (" ..." if len(differences) > 8 else "")
        raise MagsegError(
            f"output dir {output_dir} holds a different experiment (differs in {shown}); "
            "choose another --output-dir, or the same config to resume it"
        )


def _sbatch_refusal(error: Exception) -> str:
    """SLURM's reason for refusing a submission, as one line."""
    text = str(error)
    lines = [ln.strip() for ln in text.splitlines() if "error:" in ln]
    reasons: list[str] = []
    for line in lines:
        reason = re.sub(r"^sbatch: error: (Batch job submission failed: )?", "", line)
        if reason and reason not in reasons:
            reasons.append(reason)
    return "; ".join(reasons) if reasons else " ".join(text.split())[:300]


@dataclass
class Submission:
    job: Any  # submitit.Job
    cluster: str
    run_dir: Path
    params: dict[str, Any]

    @property
    def job_id(self) -> str:
        return str(self.job.job_id)

    def task_log(self, rank: int = 0, stream: str = "err") -> Path:
        return self.run_dir / f"{self.job_id}_{rank}_log.{stream}"


def submit_callable(
    kind: str,
    fn: Callable[[], Any],
    *,
    cluster: str,
    folder: str | Path,
    params: dict[str, Any],
    max_num_timeout: int = 3,
) -> Submission:
    """Submit ``fn`` (a picklable callable, ideally with a ``checkpoint`` method) as a job.

    ``folder`` may contain ``%j`` (the job id). SLURM refusals become one-line MagsegErrors.
    """
    folder = Path(folder)
    base = folder
    while "%j" in str(base):
        base = base.parent
    base.mkdir(parents=True, exist_ok=True)
    before = set(base.iterdir())
    executor = submitit.AutoExecutor(
        folder=folder, cluster=cluster, slurm_max_num_timeout=max_num_timeout,
        local_max_num_timeout=max_num_timeout,
    ) if cluster != "debug" else submitit.AutoExecutor(folder=folder, cluster=cluster)
    executor.update_parameters(**params)
    captured = io.StringIO()
    try:
        # submitit prints sbatch's stderr itself; it is turned into one line below instead.
        with contextlib.redirect_stderr(captured):
            job = executor.submit(fn)
    except (submitit.core.utils.FailedJobError, OSError) as e:
        for leftover in set(base.iterdir()) - before:  # the pickle and script of the failure
            if leftover.is_file():
                leftover.unlink()
        raise MagsegError(f"SLURM refused the {kind} job: {_sbatch_refusal(e)}") from None
    run_dir = Path(str(folder).replace("%j", str(job.job_id)))
    log.debug("submitted %s job %s to %s, run dir %s", kind, job.job_id, cluster, run_dir)
    return Submission(job=job, cluster=cluster, run_dir=run_dir, params=params)


def _job_failure_line(error: Exception) -> str:
    text = str(error).strip()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not set(ln.strip()) <= {"-"}]
    errors = [ln for ln in lines if "Error" in ln.split(":")[0] or ln.startswith("magseg")]
    return (errors[-1] if errors else (lines[-1] if lines else repr(error)))[:400]


# --- command line ---------------------------------------------------------------------------


def _add_resource_arguments(p: argparse.ArgumentParser, single_task: bool = False) -> None:
    p.add_argument("--job", metavar="PROFILE",
                   help="job profile YAML (jobs/*.yaml, or a name in jobs/): where and with what "
                        "resources; default: one process, cluster defaults")
    if single_task:
        p.add_argument("--nodes", type=int, default=1,
                       help="must be 1: this job is one task on one node")
        p.add_argument("--gpus-per-node", type=int,
                       help="GPUs for the one task (default: 1 if the profile has GPUs)")
    else:
        p.add_argument("--nodes", type=int, help="number of nodes (overrides the profile)")
        p.add_argument("--gpus-per-node", type=int, help="GPUs per node; one process per GPU")
        p.add_argument("--tasks-per-node", type=int,
                       help="DDP processes per node on CPU-only nodes (gpus_per_node 0)")
    p.add_argument("--cluster", choices=("auto", *CLUSTERS), default="auto",
                   help="slurm, local (processes on this machine) or debug (in this process); "
                        "auto: slurm when sbatch is on PATH, else local")
    p.add_argument("--name", help="run name: runs/<name>/<job id>/ (default: "
                   + ("the command, segment or evaluate)" if single_task else "the config's name)"))
    p.add_argument("--output-dir", metavar="DIR",
                   help="use exactly this run dir instead of runs/<name>/<job id>/"
                        + ("" if single_task else
                           " (an existing one with the same experiment is resumed)"))
    p.add_argument("--runs-root", default="runs", metavar="DIR",
                   help="where runs/<name>/<job id>/ go (default: ./runs)")
    p.add_argument("--dry-run", action="store_true",
                   help="print the sbatch script that would be submitted, and exit")
    p.add_argument("--wait", action="store_true",
                   help="wait for the job and print its result; exit non-zero if it fails")


def register(subparsers: Any) -> None:
    """``magseg-hpc submit ...`` (the same as ``python -m magseg_hpc.submit ...``)."""
    parser = subparsers.add_parser(
        "submit", help="submit a job to SLURM or local processes (submitit)",
        description="Submit a job to SLURM or local processes through submitit.",
    )
    _add_subcommands(parser)


def _add_subcommands(parser: argparse.ArgumentParser) -> None:
    kinds = parser.add_subparsers(dest="kind", metavar="KIND", required=True)
    train = kinds.add_parser(
        "train", help="a DDP training job (magseg_hpc.train.run_training)",
        description="Submit a DDP training job: one process per GPU, resumable.",
    )
    train.add_argument("--config", required=True, help="experiment config YAML (configs/*.yaml)")
    _add_resource_arguments(train)
    train.add_argument("overrides", nargs="*", metavar="key=value",
                       help="config overrides, e.g. train.max_iters=100")
    train.set_defaults(func=_run_train)
    for kind, command, what in (
        ("segment", "segment-volume", "IN OUT --model CKPT [segment-volume options]"),
        ("evaluate", "evaluate", "PRED TRUTH [evaluate options]"),
    ):
        p = kinds.add_parser(
            kind, help=f"`magseg-hpc {command}` as a one-task job",
            description=f"Submit `magseg-hpc {command} ...` as one task on one node. Submit "
                        f"flags come first, then the {command} arguments, after `--`.",
            usage=f"python -m magseg_hpc.submit {kind} [submit flags] -- {what}",
        )
        _add_resource_arguments(p, single_task=True)
        p.add_argument("command_args", nargs=argparse.REMAINDER, metavar=what,
                       help=f"the arguments of `magseg-hpc {command}`")
        p.set_defaults(func=_run_command, command=command)


def _print_submission(sub: Submission, kind: str) -> None:
    p = sub.params
    gpus = p.get("gpus_per_node", 0)
    resources = (f"{p['nodes']} node(s) x {p['tasks_per_node']} task(s)"
                 + (f", {gpus} GPU(s) per node" if gpus else ", CPU"))
    print(f"submitted {kind} job {sub.job_id} ({sub.cluster}: {resources})")
    print(f"run dir:  {sub.run_dir}")
    print(f"logs:     {sub.run_dir / 'logs'}/rank<R>.log; submitit: "
          f"{sub.task_log(0, 'out').name} / {sub.task_log(0, 'err').name} per task")
    print(f"follow:   tail -F {sub.run_dir / 'logs' / 'rank0.log'}")
    if sub.cluster == "slurm":
        print(f"status:   squeue -j {sub.job_id}; sacct -j {sub.job_id}; cancel: "
              f"scancel {sub.job_id}")


def _job_state(job: Any) -> str:
    """The job's state asked afresh (submitit's cached one may be stale after a requeue)."""
    try:
        info = job.get_info(mode="force")
    except Exception:  # noqa: BLE001 - the state is informative only
        return str(job.state)
    return str(info.get("State") or info.get("jobState") or job.state)


def _wait(sub: Submission, kind: str) -> int:
    print(f"waiting for job {sub.job_id} ...", flush=True)
    try:
        results = sub.job.results()
    except submitit.core.utils.UncompletedJobError as e:
        print(f"magseg-hpc: error: {kind} job {sub.job_id} failed ({_job_state(sub.job)}): "
              f"{_job_failure_line(e)}; logs: {sub.run_dir}", file=sys.stderr)
        return 1
    summary = results[0] if results else None
    # Every task has returned; SLURM may still show the job RUNNING for a moment (epilogue).
    print(f"job {sub.job_id} finished; rank 0 result: "
          f"{json.dumps(summary, default=str)}")
    return 0


def _cluster_and_name(args: argparse.Namespace, default_name: str) -> tuple[str, str]:
    if args.dry_run and args.cluster in ("auto", "slurm"):
        cluster = "slurm"  # rendering the batch script needs no SLURM on this machine
    else:
        cluster = resolve_cluster(args.cluster)
    name = args.name or default_name
    if not re.fullmatch(r"[A-Za-z0-9._+-]+", name):
        raise MagsegError(f"run name {name!r} may only use letters, digits and ._+-")
    return cluster, name


def _dry_run(cluster: str, params: dict[str, Any], folder: str) -> int:
    if cluster == "slurm":
        sys.stdout.write(sbatch_script(params, folder))
    else:
        print(f"# {cluster} executor, folder {folder}")
        print(yaml.safe_dump(params, sort_keys=True), end="")
    return 0


def _submit_and_report(kind: str, task: Callable[[], Any], args: argparse.Namespace,
                       cluster: str, folder: str, params: dict[str, Any],
                       profile: JobProfile) -> int:
    sub = submit_callable(kind, task, cluster=cluster, folder=folder, params=params,
                          max_num_timeout=profile.max_num_timeout)
    _print_submission(sub, kind)
    if args.wait or cluster == "debug":  # a debug job only runs when its result is asked for
        return _wait(sub, kind)
    return 0


def _run_train(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)  # bad keys fail here, before submission
    config = config_to_dict(cfg)
    profile = load_job_profile(args.job)
    cluster, name = _cluster_and_name(args, cfg.name)
    params = executor_parameters(
        profile, cluster=cluster, name=name, nodes=args.nodes,
        gpus_per_node=args.gpus_per_node, tasks_per_node=args.tasks_per_node,
    )
    from magseg_hpc.commands.train import check_run_paths

    if args.output_dir:
        output_dir = Path(args.output_dir).absolute()
        check_output_dir(output_dir, config)
    # the run dir is usable and (unless a dry run) the data exist, before anything is submitted
    check_run_paths(cfg, args.output_dir, check_data=not args.dry_run)
    if args.output_dir:
        folder = str(output_dir)
    else:
        folder = str(Path(args.runs_root).absolute() / name / "%j")
    if args.dry_run:
        return _dry_run(cluster, params, folder)
    task = TrainTask(config, folder, uuid.uuid4().hex, resume_any=bool(args.output_dir))
    return _submit_and_report("train", task, args, cluster, folder, params, profile)


def check_command_args(command: str, argv: Sequence[str]) -> list[str]:
    """Parse ``magseg-hpc <command> argv`` as the job will, and check that its inputs exist,
    so bad input fails at submission in one line. Returns the job's full argv."""
    from magseg_hpc import cli

    full = [command, *argv]
    captured = io.StringIO()
    try:
        with contextlib.redirect_stderr(captured):
            parsed = cli.build_parser().parse_args(full)
    except SystemExit:
        lines = [ln for ln in captured.getvalue().splitlines() if "error:" in ln]
        reason = lines[-1].split("error:", 1)[1].strip() if lines else "bad arguments"
        raise MagsegError(f"magseg-hpc {command}: {reason}; see `magseg-hpc {command} -h` "
                          "(its arguments go after the submit flags and `--`)") from None
    if command == "segment-volume":
        inputs = {"input volume": parsed.input, "--model checkpoint": parsed.model}
    else:
        inputs = {"PRED": parsed.pred, "TRUTH": parsed.truth}
    for what, spec in inputs.items():
        if spec is not None and not volume_file(spec).exists():
            raise MagsegError(f"{what} {spec} does not exist (relative to {Path.cwd()}); "
                              "fix the path and resubmit")
    parsed.check(parsed)  # the command's own flag and output checks, as the job will run them
    return full


def _run_command(args: argparse.Namespace) -> int:
    kind, command = args.kind, args.command
    command_args = list(args.command_args)
    if command_args[:1] == ["--"]:
        command_args = command_args[1:]
    if not command_args:
        raise MagsegError(f"no {command} arguments: give them after the submit flags, e.g. "
                          f"`python -m magseg_hpc.submit {kind} --job jobs/local.yaml -- ...`")
    argv = check_command_args(command, command_args)
    if args.nodes != 1:
        raise MagsegError(f"submit {kind} runs one task on one node, got --nodes {args.nodes}; "
                          "for many nodes use segment-volume's own --cluster slurm --jobs N")
    profile = load_job_profile(args.job)
    cluster, name = _cluster_and_name(args, kind)
    gpus = args.gpus_per_node
    if gpus is None:
        gpus = min(profile.gpus_per_node, 1) if kind == "segment" else 0
    # One task whatever the GPUs: executor_parameters ties tasks to GPUs for DDP training.
    params = executor_parameters(profile, cluster=cluster, name=name, nodes=1,
                                 gpus_per_node=gpus, tasks_per_node=None if gpus else 1)
    params["tasks_per_node"] = 1
    if cluster == "slurm":  # the command, readable in the batch script in the run dir
        params["slurm_setup"] = [f"# magseg-hpc job: {shlex.join(['magseg-hpc', *argv])}",
                                 *params.get("slurm_setup", [])]
    if args.output_dir:
        folder = str(Path(args.output_dir).absolute())
    else:
        folder = str(Path(args.runs_root).absolute() / name / "%j")
    if args.dry_run:
        if cluster != "slurm":
            print(f"# magseg-hpc job: {shlex.join(['magseg-hpc', *argv])}")
        return _dry_run(cluster, params, folder)
    task = CommandTask(argv, str(Path.cwd()), folder)
    return _submit_and_report(kind, task, args, cluster, folder, params, profile)


def build_parser() -> argparse.ArgumentParser:
    from magseg_hpc.cli import OneLineParser

    parser = OneLineParser(
        prog="python -m magseg_hpc.submit",
        description="Submit magseg-hpc jobs to SLURM (or local processes) through submitit.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    _add_subcommands(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from magseg_hpc.cli import run_command, setup_logging

    args = build_parser().parse_args(argv)
    setup_logging(args.verbose, level=logging.WARNING)
    return run_command(args)


if __name__ == "__main__":
    # Run main from the imported module, not from __main__: TrainTask/CommandTask must pickle
    # as magseg_hpc.submit.<class> for the job to find them.
    from magseg_hpc.submit import main as _main

    sys.exit(_main())
