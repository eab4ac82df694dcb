"""The validation curves of tuning runs on the published sweep, side by side.

Each run is a ``magseg-hpc train`` folder (as ``bench_real.py`` trains them: cpu_best, the 8
painted slices, 2 for validation) on a tuning seed; this reads their metrics.jsonl and
config.yaml and writes a results file with the teacher's and the student's validation mIoU at
every evaluation, the largest drop below the running best after the supervised-only epochs,
and what each run changed against the shipped config.

    .venv/bin/python benchmarks/real/tuning_curves.py --name real_tuning \\
        shipped=/tmp/tune/shipped-0 average=/tmp/tune/average-0 ...
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _results import write_results  # noqa: E402

from magseg_hpc.config import config_to_dict, experiment_differences, load_config  # noqa: E402


def curve(run: Path) -> dict[int, tuple[float, float]]:
    """iteration -> (teacher mIoU, student mIoU) at each evaluation."""
    out = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "teacher_miou" in record:
            out[record["iteration"]] = (record["teacher_miou"], record["student_miou"])
    return out


def largest_drop(points: dict[int, tuple[float, float]], after: int) -> float:
    best, drop = None, 0.0
    for it, (teacher, _) in sorted(points.items()):
        if best is not None and it > after:
            drop = max(drop, best - teacher)
        best = teacher if best is None else max(best, teacher)
    return drop


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--name", default="real_tuning", help="results file name")
    p.add_argument("--note", default="", help="a paragraph for the results file")
    p.add_argument("runs", nargs="+", metavar="LABEL=RUN_DIR")
    a = p.parse_args()
    shipped = config_to_dict(load_config("cpu_best"))
    rows, raw = [], {}
    for spec in a.runs:
        label, _, folder = spec.partition("=")
        run = Path(folder)
        config = yaml.safe_load((run / "config.yaml").read_text())
        t = config["train"]
        changed = [d for d in experiment_differences(shipped, config)
                   if not d.startswith(("data.", "name", "seed"))]
        points = curve(run)
        after = t["sup_only_epochs"] * t["iters_per_epoch"]
        drop = largest_drop(points, after)
        raw[label] = {"seed": config["seed"], "changed": changed,
                      "validation": {str(k): v for k, v in points.items()},
                      "largest_drop_after_sup_only": drop}
        curve_text = ", ".join(f"{it}: {te:.2f}/{st:.2f}" for it, (te, st) in points.items())
        rows.append(f"| {label} | {config['seed']} | {', '.join(changed) or '(as shipped)'} | "
                    f"{drop:.3f} | {curve_text} |")
    body = "\n".join([
        a.note, "",
        "| run | seed | changed against cpu_best | largest teacher drop after sup-only | "
        "validation mIoU teacher/student at each evaluation |",
        "|---|---|---|---|---|", *rows])
    print(write_results(a.name, "Tuning runs on the published sweep", body, raw))


if __name__ == "__main__":
    main()
