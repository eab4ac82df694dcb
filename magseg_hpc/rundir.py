"""The training run folder: its layout, and which folders are run folders of ours.

Training writes config.yaml, metrics.jsonl and curves.png into its folder and clears splits/
of a run that failed before its first checkpoint, so it must never take a folder a user
keeps other things in. A folder is a run folder of ours when it holds RUN_MARKER (written
when a run claims the folder, before anything else) or the launcher's SUBMISSION_FILE that
names this folder (its path, and a token the tool made: a marker copied into a user's folder
from another run names that run's folder, and is refused), or a checkpoint (a run folder
that was moved: training then rewrites its marker). A marker that names no folder proves
nothing on its own. Anything else that is not empty is refused, by training and by the
launcher's pre-submit check alike.

A run folder with a checkpoint belongs to one experiment: training resumes it with the same
config (runtime keys such as the device may change) and refuses any other, and the launcher
refuses it before submitting anything (``check_run_folder``, the one check of both).
``claim`` is the one claim: it checks, then marks the folder ours.
"""

from __future__ import annotations

import json
import re
import socket
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import yaml

from magseg_hpc.config import RUNTIME_KEYS, experiment_differences
from magseg_hpc.errors import MagsegError
from magseg_hpc.paths import atomic_write
from magseg_hpc.yamlfile import load_yaml

CONFIG_FILE, CHECKPOINT_FILE, BEST_FILE = "config.yaml", "checkpoint.pt", "best.pt"
METRICS_FILE, CURVES_FILE, SPLITS_DIR, LOGS_DIR = "metrics.jsonl", "curves.png", "splits", "logs"
SUMMARY_FILE = "summary.json"  # the finished (or stopped) run, as data
TENSORBOARD_DIR = "tensorboard"  # event files: tensorboard --logdir RUN_DIR
SUBMISSION_FILE = "submission.json"  # the submission a job belongs to
RUN_MARKER = ".magseg-run.json"


def has_checkpoint(path: Path) -> bool:
    """A run that got as far as its first checkpoint (before that nothing binds the folder)."""
    return any((path / name).is_file() for name in (CHECKPOINT_FILE, BEST_FILE))


# the record field holding the token the tool made, by record file
TOKEN_KEYS = {RUN_MARKER: "token", SUBMISSION_FILE: "submission_id"}


def _read_record(path: Path) -> dict | None:
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):  # UnicodeDecodeError included
        return None
    return record if isinstance(record, dict) else None


def _names(record: dict | None, name: str, path: Path) -> bool:
    """Whether a marker or submission record names the folder ``path``: its path (links
    resolved: a link to the folder is the folder) and a token the tool made."""
    if record is None:
        return False
    token, where = record.get(TOKEN_KEYS[name]), record.get("path")
    if not (isinstance(token, str) and re.fullmatch(r"[0-9a-f]{32}", token)
            and isinstance(where, str) and where):
        return False
    try:
        return Path(where).resolve() == path.resolve()
    except (OSError, RuntimeError):  # a loop of links
        return False


def is_run_folder(path: Path) -> bool:
    return (any(_names(_read_record(path / name), name, path) for name in TOKEN_KEYS)
            or has_checkpoint(path))


def _not_ours_because(path: Path) -> str:
    """Why a marker in ``path`` proves nothing (one clause), or ''."""
    if not (path / RUN_MARKER).exists():
        return ""
    where = (_read_record(path / RUN_MARKER) or {}).get("path")
    if isinstance(where, str) and where:
        return f"; its {RUN_MARKER} was made for {where}, not this folder (copied?)"
    return f"; its {RUN_MARKER} names no folder (copied, or made by an older magseg-hpc)"


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
            f"{flag} {path} is not empty and not a magseg-hpc run folder (it holds {shown})"
            f"{_not_ours_because(path)}; training would overwrite or delete files there: "
            "give a new or empty folder"
        )


@dataclass(frozen=True)
class SubmissionRecord:
    """The submission a job's run folder belongs to (SUBMISSION_FILE)."""

    submission_id: str
    job_id: str
    resume_any: bool = False  # an explicit --output-dir: any later submission may resume it


def claim(path: Path, config: dict | None = None, *, flag: str = "--output-dir", rank: int = 0,
          submission: SubmissionRecord | None = None) -> None:
    """Check ``path`` and make it a run folder of ours: the one claim, made by ``submit``
    before submitit writes into an explicit --output-dir, and by a training as it starts.

    Refused in one line: a folder that is not absent, empty or ours; one holding a checkpoint
    of another experiment than ``config`` (None: nothing to compare); a job's folder made by
    another submission (SLURM job ids reused after a reset) unless ``submission.resume_any``.
    A job's ``submission`` is recorded first: the record names the folder, which makes the
    folder submitit made for the job ours. Then the marker names this folder and a token made
    here, so a copy of it elsewhere claims nothing. Only rank 0 writes; another rank of the
    same run checks what rank 0's writes do not change, and meets rank 0 at the process
    group's rendezvous once it has claimed the folder.
    """
    if submission is not None:
        previous = _read_record(path / SUBMISSION_FILE) if (path / SUBMISSION_FILE).exists() \
            else None
        if previous is not None and previous.get("submission_id") != submission.submission_id \
                and not submission.resume_any:
            raise MagsegError(
                f"run dir {path} holds job {previous.get('job_id')} of another "
                "submission (were SLURM job ids reset?); move it away and resubmit"
            )
    if config is not None:
        check_run_folder(path, config, flag, check_claim=False)
    if rank != 0:
        return
    if submission is not None:
        path.mkdir(parents=True, exist_ok=True)
        record = {"submission_id": submission.submission_id, "job_id": submission.job_id,
                  "path": str(path.absolute()), "host": socket.gethostname(),
                  "started": time.strftime("%FT%T%z")}
        atomic_write(path / SUBMISSION_FILE, json.dumps(record, indent=1) + "\n")
    check_claimable(path, flag)
    path.mkdir(parents=True, exist_ok=True)
    marker = path / RUN_MARKER
    if not _names(_read_record(marker), RUN_MARKER, path):  # new, moved, or naming no folder
        record = {"kind": "magseg-hpc training run", "path": str(path.absolute()),
                  "token": uuid.uuid4().hex, "host": socket.gethostname(),
                  "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        atomic_write(marker, json.dumps(record) + "\n")


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
    ours; skipped without ``check_claim``) and holds no checkpoint of another experiment."""
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

