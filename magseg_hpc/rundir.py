"""The training run folder: its layout, and which folders are run folders of ours.

Training writes config.yaml, metrics.jsonl and curves.png into its folder and clears splits/
of a run that failed before its first checkpoint, so it must never take a folder a user
keeps other things in. A folder is a run folder of ours when it holds RUN_MARKER (written
when a run claims the folder, before anything else), the launcher's SUBMISSION_FILE, or a
checkpoint (folders of versions before the marker). Anything else that is not empty is
refused, by training and by the launcher's pre-submit check alike.

A run folder with a checkpoint belongs to one experiment: training resumes it with the same
config (runtime keys such as the device may change) and refuses any other, and the launcher
refuses it before submitting anything (``check_run_folder``, the one check of both).
"""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path

import yaml

from magseg_hpc.config import RUNTIME_KEYS, experiment_differences, load_yaml
from magseg_hpc.errors import MagsegError

CONFIG_FILE, CHECKPOINT_FILE, BEST_FILE = "config.yaml", "checkpoint.pt", "best.pt"
METRICS_FILE, CURVES_FILE, SPLITS_DIR, LOGS_DIR = "metrics.jsonl", "curves.png", "splits", "logs"
SUMMARY_FILE = "summary.json"  # the finished (or stopped) run, as data
TENSORBOARD_DIR = "tensorboard"  # event files: tensorboard --logdir RUN_DIR
SUBMISSION_FILE = "submission.json"  # the submission a job belongs to
RUN_MARKER = ".magseg-run.json"


def has_checkpoint(path: Path) -> bool:
    """A run that got as far as its first checkpoint (before that nothing binds the folder)."""
    return any((path / name).is_file() for name in (CHECKPOINT_FILE, BEST_FILE))


def is_run_folder(path: Path) -> bool:
    return any((path / name).is_file()
               for name in (RUN_MARKER, SUBMISSION_FILE, CHECKPOINT_FILE, BEST_FILE))


def check_claimable(path: Path, flag: str = "--output-dir") -> None:
    """Refuse ``path`` unless it is absent, an empty folder or a run folder of ours."""
    if path.exists() and not path.is_dir():
        raise MagsegError(f"{flag} {path} is a regular file; give a folder path")
    if not path.is_dir() or is_run_folder(path):
        return
    entries = sorted(p.name for p in path.iterdir())
    if entries:
        shown = ", ".join(entries[:5]) + (" ..." if len(entries) > 5 else "")
        raise MagsegError(
            f"{flag} {path} is not empty and not a magseg-hpc run folder (it holds {shown}); "
            "training would overwrite or delete files there: give a new or empty folder"
        )


def claim(path: Path) -> None:
    """Make ``path`` a run folder of ours; call once every check has passed."""
    path.mkdir(parents=True, exist_ok=True)
    marker = path / RUN_MARKER
    if not marker.exists():
        record = {"kind": "magseg-hpc training run", "host": socket.gethostname(),
                  "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        tmp = path / f".{RUN_MARKER}.tmp"
        tmp.write_text(json.dumps(record) + "\n")
        tmp.replace(marker)


def saved_experiment(path: Path, flag: str = "--output-dir") -> dict | None:
    """The experiment config a run folder holds: config.yaml, else (lost) the checkpoint's."""
    saved = path / CONFIG_FILE
    if saved.is_file():
        try:
            config = load_yaml(saved.read_text())
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
            reason = " ".join(str(e).split())[:200]
            raise MagsegError(f"cannot read {saved} ({reason}); use a new {flag}") from None
        if not isinstance(config, dict):
            raise MagsegError(f"{saved} is not a config mapping; use a new {flag}")
        return config
    if (path / CHECKPOINT_FILE).is_file():
        from magseg_hpc.models.checkpoint import load_checkpoint  # torch: only when needed

        return load_checkpoint(path / CHECKPOINT_FILE).get("config")
    return None


def check_run_folder(path: Path, config: dict, flag: str = "--output-dir", *,
                     check_claim: bool = True) -> None:
    """Refuse ``path`` for the experiment ``config`` unless it is claimable (absent, empty or
    ours; skip with ``check_claim`` where another process claims it) and holds no checkpoint
    of another experiment."""
    if check_claim:
        check_claimable(path, flag)
    if not has_checkpoint(path):
        return
    old = saved_experiment(path, flag)
    diff = experiment_differences(old, config) if old else []
    if diff:
        shown = ", ".join(diff[:8]) + (" ..." if len(diff) > 8 else "")
        raise MagsegError(
            f"{flag} {path} holds another experiment (config differs in {shown}); use a new "
            f"{flag}, or the same config to resume it (only {', '.join(sorted(RUNTIME_KEYS))} "
            "may change)"
        )


def claim_for_submission(path: Path, submission_id: str, job_id: str, *, rank: int,
                         resume_any: bool) -> None:
    """Mark ``path`` as the run dir of one submission (``submission.json``); refuse one made
    by another submission (e.g. job ids reused after a reset), unless ``resume_any`` (an
    explicit ``--output-dir`` may be resumed by any later submission). Rank 0 writes."""
    marker = path / SUBMISSION_FILE
    if marker.exists():
        previous = json.loads(marker.read_text())
        if previous.get("submission_id") != submission_id and not resume_any:
            raise MagsegError(
                f"run dir {path} holds job {previous.get('job_id')} of another "
                "submission (were SLURM job ids reset?); move it away and resubmit"
            )
    if rank == 0:
        record = {"submission_id": submission_id, "job_id": job_id,
                  "host": socket.gethostname(), "started": time.strftime("%FT%T%z")}
        tmp = marker.with_name(f".{marker.name}.tmp")
        tmp.write_text(json.dumps(record, indent=1) + "\n")
        tmp.replace(marker)
