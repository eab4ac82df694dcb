"""``python -m magseg_hpc.submit`` / ``magseg-hpc submit``: submit training, segment-volume
or evaluate as SLURM jobs (or local processes) through :mod:`magseg_hpc.launch`.

``submit train --config FILE [--job jobs/PROFILE.yaml] [flags] [key=value ...]`` runs
``launch.jobs.train_job`` (DDP, one process per GPU, resumable) in
``runs/<name>/<job id>/``; ``submit segment|evaluate [flags] -- ARGS`` runs one
segment-volume or evaluate as a one-task job: the arguments are parsed and checked here into
the command's spec, which the job runs (:mod:`magseg_hpc.launch.jobs`). Flags override the
job profile.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import re
import shlex
import sys
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import submitit
import yaml

from magseg_hpc import cli
from magseg_hpc.cli import OneLineParser, run_command, setup_logging
from magseg_hpc.commands.train import check_run_paths
from magseg_hpc.config import config_to_dict, load_config
from magseg_hpc.errors import MagsegError
from magseg_hpc.launch.jobs import TrainSpec, evaluate_job, segment_job, train_job
from magseg_hpc.launch.profile import JobProfile, load_job_profile
from magseg_hpc.launch.resources import CLUSTERS, executor_parameters, resolve_cluster
from magseg_hpc.launch.sbatch import sbatch_script
from magseg_hpc.launch.submission import (
    Submission,
    job_failure_line,
    job_state,
    submit_callable,
)
from magseg_hpc.launch.tasks import Task
from magseg_hpc.paths import volume_file
from magseg_hpc.rundir import check_run_folder, claim
from magseg_hpc.staging import writer_lock
from magseg_hpc.train.setup import check_experiment

__all__ = ["register", "build_parser", "main", "check_command_args"]


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
    train.add_argument("--config", required=True,
                       help="experiment config: a YAML path or a shipped config's name "
                       "(magseg-hpc configs)")
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


def _wait(sub: Submission, kind: str) -> int:
    print(f"waiting for job {sub.job_id} ...", flush=True)
    try:
        results = sub.job.results()
    except (submitit.core.utils.UncompletedJobError, submitit.core.utils.FailedJobError) as e:
        line = job_failure_line(e)
        if re.search(r"by peer|Connection (reset|closed|refused)|timed? ?out", line, re.I):
            line += (" (a peer rank died or its node was lost: see every rank's "
                     f"{sub.job_id}_<rank>_log.err)")
        print(f"magseg-hpc: error: {kind} job {sub.job_id} failed ({job_state(sub.job)}): "
              f"{line}; logs: {sub.run_dir}", file=sys.stderr)
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
    # bad keys fail here, before submission
    cfg = check_experiment(load_config(args.config, args.overrides))
    config = config_to_dict(cfg)
    profile = load_job_profile(args.job)
    cluster, name = _cluster_and_name(args, cfg.name)
    params = executor_parameters(
        profile, cluster=cluster, name=name, nodes=args.nodes,
        gpus_per_node=args.gpus_per_node, tasks_per_node=args.tasks_per_node,
    )

    if args.output_dir:
        output_dir = Path(args.output_dir).absolute()
        check_run_folder(output_dir, config)
    # the run dir is usable and (unless a dry run) the data exist, before anything is submitted
    check_run_paths(cfg, args.output_dir, check_data=not args.dry_run)
    if args.output_dir:
        folder = str(output_dir)
    else:
        folder = str(Path(args.runs_root).absolute() / name / "%j")
    if args.dry_run:
        return _dry_run(cluster, params, folder)
    if args.output_dir:
        # ours before submitit writes its files there; not while a training writes it
        with writer_lock(output_dir, shlex.join(["python", "-m", "magseg_hpc.submit",
                                                 *sys.argv[1:]])):
            claim(output_dir, config)
    spec = TrainSpec(config, uuid.uuid4().hex, resume_any=bool(args.output_dir))
    task = Task(train_job, spec, folder, str(Path.cwd()))
    return _submit_and_report("train", task, args, cluster, folder, params, profile)


def check_command_args(command: str, argv: Sequence[str]) -> tuple[list[str], Any]:
    """Parse ``magseg-hpc <command> argv`` into the command's spec and check it and that its
    inputs exist, so bad input fails at submission in one line. Returns the full argv (for
    the batch script's comment) and the spec the job runs."""
    full = [command, *argv]
    captured = io.StringIO()
    try:
        with contextlib.redirect_stderr(captured):
            parsed = cli.build_parser(full).parse_args(full)
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
    return full, parsed.job_spec(parsed)


def _run_command(args: argparse.Namespace) -> int:
    kind, command = args.kind, args.command
    command_args = list(args.command_args)
    if command_args[:1] == ["--"]:
        command_args = command_args[1:]
    if not command_args:
        raise MagsegError(f"no {command} arguments: give them after the submit flags, e.g. "
                          f"`python -m magseg_hpc.submit {kind} --job jobs/local.yaml -- ...`")
    argv, spec = check_command_args(command, command_args)
    if args.nodes != 1:
        raise MagsegError(f"submit {kind} runs one task on one node, got --nodes {args.nodes}; "
                          "for many nodes use segment-volume's own --cluster slurm --jobs N")
    profile = load_job_profile(args.job)
    cluster, name = _cluster_and_name(args, kind)
    if cluster != "slurm" and getattr(spec.cluster, "cluster", None) == "slurm":
        resolve_cluster("slurm")  # the job runs here and starts its workers with sbatch
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
    task = Task(segment_job if kind == "segment" else evaluate_job, spec, folder,
                str(Path.cwd()))
    return _submit_and_report(kind, task, args, cluster, folder, params, profile)


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="python -m magseg_hpc.submit",
        description="Submit magseg-hpc jobs to SLURM (or local processes) through submitit.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    _add_subcommands(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose, level=logging.WARNING)
    return run_command(args)
