"""Shared by the benchmark scripts: write a results file that says where its numbers came from.

Each results file (``benchmarks/results/<name>.md`` and ``<name>.json``) holds the git commit
(short hash, flagged when the code was not committed), the exact command line, the machine
(usable cores, torch and Python versions) and the raw numbers, so every README figure can be
traced to a command that produced it.
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path

from magseg_hpc import precision

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
# What the numbers depend on; the results folder itself is left out (it changes on every run).
CODE_PATHS = ["magseg_hpc", "configs", "benchmarks", "tests", "pyproject.toml",
              ":(exclude)benchmarks/results"]


def commit() -> str:
    """Short commit hash, with ' (with uncommitted changes)' if the code differs from it."""
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                             capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", *CODE_PATHS],
                               cwd=ROOT, capture_output=True, text=True).stdout.strip()
        return rev + (" (with uncommitted changes)" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def command() -> str:
    """The command line that ran this benchmark, as it can be pasted from the repository root."""
    script = Path(sys.argv[0]).resolve()
    try:
        script = script.relative_to(ROOT)
    except ValueError:
        pass
    return shlex.join([".venv/bin/python", str(script), *sys.argv[1:]])


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo ("unknown" where there is none)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def machine() -> dict:
    """Cores this process may use, torch threads and versions, and the load when asked."""
    info = {"cores_usable": len(os.sched_getaffinity(0)), "cores_total": os.cpu_count(),
            "load_avg_1_5_15": list(os.getloadavg()), "python": platform.python_version(),
            "platform": platform.platform(), "cpu": cpu_model(),
            # Training and segment times differ ~2x with it (precision "auto" takes bf16 there).
            "cpu_bf16": precision.cpu_has_bf16()}
    try:
        import torch

        info.update(torch=torch.__version__, torch_threads=torch.get_num_threads(),
                    cuda=torch.cuda.is_available())
    except ImportError:
        pass
    for var in ("OMP_NUM_THREADS",):
        if var in os.environ:
            info[var] = os.environ[var]
    return info


# Taken when a benchmark starts (it imports this module first), not when it ends: code edited
# while a long benchmark runs must not be credited to the commit.
AT_START = {"commit": commit(), "command": command()}


def machine_line(m: dict) -> str:
    """One line of a results file saying which machine the numbers came from."""
    return (f"Machine: {m['cpu']}, {m['cores_usable']} usable of {m['cores_total']} cores, "
            f"bf16 {'native' if m['cpu_bf16'] else 'not native (fp32)'}, load average "
            + "/".join(f"{v:.1f}" for v in m["load_avg_1_5_15"])
            + (f", torch {m['torch']} ({m['torch_threads']} threads)" if "torch" in m else "")
            + f", Python {m['python']}.")


def write_results(name: str, title: str, body: str, raw: dict, *, note: str = "") -> Path:
    """Write ``benchmarks/results/<name>.md`` (body + provenance + raw JSON) and ``.json``."""
    meta = {**AT_START, "machine": machine()}
    lines = [
        f"# {title}",
        "",
        f"Commit {meta['commit']}. Command: `{meta['command']}`",
        "",
        machine_line(meta["machine"]) + (f" {note}" if note else ""),
        "",
        body.rstrip(),
        "",
        "Raw numbers (also in `" + f"{name}.json`):",
        "",
        "```json",
        json.dumps(raw, indent=1, sort_keys=True),
        "```",
        "",
    ]
    RESULTS.mkdir(parents=True, exist_ok=True)
    md = RESULTS / f"{name}.md"
    md.write_text("\n".join(lines))
    (RESULTS / f"{name}.json").write_text(
        json.dumps({**meta, "results": raw}, indent=1, sort_keys=True) + "\n")
    return md
