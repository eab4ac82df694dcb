"""Run records and done markers: what makes ``--resume`` safe.

Inside the output store, under ``OUT/.magseg/`` (ignored by zarr and xarray):

- ``run.json``: the run fingerprint, a sha256 over everything that decides the output bytes
  (model checksum or threshold parameters, class table, normalisation, axes, TTA, whether
  probabilities are stored, slab size and chunks, input shape, dtype, chunks and variable),
  plus those fields in clear so a refusal can name what differs. Batch size, device, worker
  counts and the cluster are not in it: they do not change which slab writes what.
- ``done/<stage>-<index>``: one empty file per finished slab, created by the client only
  after the slab's task returned, i.e. after its write returned. A run killed at any point
  leaves at worst finished-but-unmarked slabs, which a resume recomputes and rewrites with
  identical bytes (each slab owns its chunks).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

from magseg_hpc.errors import MagsegError
from magseg_hpc.paths import atomic_write

RUN_FORMAT = "magseg-hpc/segment-run/1"


def state_dir(output: str | Path) -> Path:
    return Path(output) / ".magseg"


def fingerprint(fields: dict) -> str:
    text = json.dumps(fields, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def write_run_record(output: str | Path, fields: dict) -> str:
    """Store the run's fingerprint and fields (atomically); returns the fingerprint."""
    d = state_dir(output)
    d.mkdir(parents=True, exist_ok=True)
    fp = fingerprint(fields)
    atomic_write(d / "run.json", json.dumps(
        {"format": RUN_FORMAT, "fingerprint": fp, "fields": fields}, indent=1, sort_keys=True,
        default=str))
    return fp


def read_run_record(output: str | Path) -> dict | None:
    path = state_dir(output) / "run.json"
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return record if record.get("format") == RUN_FORMAT else None


def check_resumable(output: str | Path, fields: dict) -> None:
    """Refuse to resume ``output`` unless it was started with the same fingerprint."""
    record = read_run_record(output)
    if record is None:
        raise MagsegError(
            f"{output}: has no segment-volume run record, so it cannot be resumed; "
            "pass --overwrite to start it again"
        )
    # Compare through JSON so tuples and lists agree.
    fields = json.loads(json.dumps(fields, default=str))
    if record["fingerprint"] == fingerprint(fields):
        return
    old = record.get("fields", {})
    diff = sorted(k for k in set(old) | set(fields) if old.get(k) != fields.get(k))
    detail = "; ".join(f"{k}: was {_short(old.get(k))}, now {_short(fields.get(k))}" for k in diff)
    raise MagsegError(
        f"{output}: was started with other settings ({detail or 'fingerprint differs'}); "
        "resume with the same model and options, or pass --overwrite to start again"
    )


def _short(value) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 40 else text[:37] + "..."


class DoneMarkers:
    """One empty file per finished slab under ``OUT/.magseg/done/``."""

    def __init__(self, output: str | Path):
        self.dir = state_dir(output) / "done"

    def done(self) -> set[str]:
        if not self.dir.is_dir():
            return set()
        return {p.name for p in self.dir.iterdir() if not p.name.startswith(".")}

    def mark(self, key: str) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / key).touch()

    def unmark(self, keys) -> None:
        for key in keys:
            (self.dir / key).unlink(missing_ok=True)

    def clear(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)
