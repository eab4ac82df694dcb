"""Does the fusion check pick the better of z alone and z,y,x fused on held-out volumes?

``magseg-hpc train`` ends a multi-axis run by segmenting its validation slices along the
labelled axis alone and fused over the trained planes (``magseg_hpc.train.fusion_check``);
``segment-volume --axes auto`` fuses only when fusion scored higher there. This reads the
trainings of ``bench_phantom.py`` work dirs, runs the same check on each ``best.pt`` (the
teacher, the training volume's validation slices; the one stored in best.pt when it has one)
and sets its choice against the mIoU that z alone and fused scored on the held-out test
volume (the ``eval_<method>.json`` and ``eval_<method>_fused.json`` the benchmark wrote).

    .venv/bin/python benchmarks/bench_fusion_check.py --workdir runs/bench_phantom \
        --workdir runs/bench_2slices

Writes ``benchmarks/results/fusion_check.md`` (and ``fusion_check.json``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _results import write_results  # noqa: E402

from magseg_hpc.config import config_from_dict  # noqa: E402
from magseg_hpc.data.slices import VolumeSlices  # noqa: E402
from magseg_hpc.data.splits import read_split  # noqa: E402
from magseg_hpc.models.checkpoint import load_inference_model  # noqa: E402
from magseg_hpc.segment.pipeline import FUSION_MIN_SHARE  # noqa: E402
from magseg_hpc.train.fusion_check import check_fusion, fuses  # noqa: E402
from magseg_hpc.train.setup import train_axes  # noqa: E402

METHODS = ("supervised", "augseg", "ceiling")


def check_run(run: Path) -> dict:
    """best.pt's fusion check: the stored one, else measured now as training would (and kept
    in RUN/fusion_check.json, so a rerun measures only new trainings)."""
    model, ckpt = load_inference_model(run / "best.pt")
    if ckpt.get("fusion_check"):
        return dict(ckpt["fusion_check"], stored=True)
    cache = run / "fusion_check.json"
    if cache.is_file():
        return json.loads(cache.read_text())
    cfg = config_from_dict(ckpt["config"])
    volume = VolumeSlices(cfg.data.volume, cfg.data.axis, label_path=cfg.data.label_volume)
    check = check_fusion(model, volume, read_split(run / "splits" / "val.txt"),
                         axes=train_axes(cfg), num_classes=cfg.class_table.num_classes,
                         context=int(ckpt["model"].get("context_slices", 1)),
                         trained_normalization=ckpt["normalization"])
    check["stored"] = False
    cache.write_text(json.dumps(check))
    return check


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", action="append", required=True,
                        help="a bench_phantom.py --workdir (repeatable)")
    args = parser.parse_args()

    raw, rows = {}, []
    for work in map(Path, args.workdir):
        for d in sorted(p for p in work.glob("*_seed*") if p.is_dir()):
            for method in METHODS:
                run, single = d / f"train_{method}", d / f"eval_{method}.json"
                fused = d / f"eval_{method}_fused.json"
                if not ((run / "best.pt").is_file() and single.is_file() and fused.is_file()):
                    continue
                primary = {name: sum(":" not in k for k in read_split(
                    run / "splits" / f"{name}.txt")) for name in ("labeled", "unlabeled", "val")}
                n_labeled = primary["labeled"]
                # the rule --axes auto followed before the check: the labelled share
                share_rule = ("fused" if n_labeled / sum(primary.values()) >= FUSION_MIN_SHARE
                              else "axis")
                check = check_run(run)
                test = {"axis": json.loads(single.read_text())["miou"],
                        "fused": json.loads(fused.read_text())["miou"]}
                chose = "fused" if fuses(check) else "axis"
                key = f"{work.name}/{d.name}/{method}"
                raw[key] = {"check": check, "test": test, "chose": chose,
                            "share_rule": share_rule, "n_labeled": n_labeled}
                best = max(test.values())
                rows.append(
                    f"| {d.name} | {method} | {n_labeled} | {check['axis_miou']:.3f} | "
                    f"{check['fused_miou']:.3f} | {test['axis']:.3f} | {test['fused']:.3f} | "
                    f"{'fused' if chose == 'fused' else 'z'} | {test[chose] - best:+.3f} | "
                    f"{test[share_rule] - best:+.3f} |")
                print(rows[-1], flush=True)

    def costs(rule: str) -> tuple[int, float, float]:
        lost = [v["test"][v[rule]] - max(v["test"].values()) for v in raw.values()]
        return sum(x == 0 for x in lost), float(np.mean(lost)), min(lost)

    (right, mean, worst), (right_share, mean_share, worst_share) = map(
        costs, ("chose", "share_rule"))
    body = (
        "Each training's `best.pt` (teacher): the fusion check on its training volume's "
        "validation slices (the last 8 z slices, never trained on), what `--axes auto` then "
        "chooses, and what z alone and fused scored on the held-out test volume. The last "
        "columns: the test mIoU of that choice, and of the labelled-share rule it replaced "
        f"(fuse when labelled slices were >= {FUSION_MIN_SHARE:.0%} of the volume's), minus "
        "the better of the two (0: it chose the better). "
        f"Work dirs: {', '.join(f'`{w}`' for w in args.workdir)}.\n\n"
        "| volume | method | labelled z slices | check: z | check: fused | test: z | "
        "test: fused | auto chooses | vs the better | share rule: vs the better |\n"
        "|---|---|---|---|---|---|---|---|---|---|\n"
        + "\n".join(rows)
        + f"\n\nThe check chose the better one in {right} of {len(raw)} trainings (mean cost "
        f"over all {mean:+.4f} mIoU, worst {worst:+.4f}); the labelled-share rule in "
        f"{right_share} (mean {mean_share:+.4f}, worst {worst_share:+.4f}).\n")
    path = write_results("fusion_check", "Fusion check: z alone or fused, chosen on validation",
                         body, raw)
    print(path.read_text().split("Raw numbers")[0])


if __name__ == "__main__":
    main()
