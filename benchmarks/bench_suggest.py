"""Suggestion benchmark: are the slices suggest-slices picks worth more than evenly spaced ones?

For each seed ``s`` (training phantom ``s``, validation phantom ``s + 500`` to pick
``best.pt``, test phantom ``s + 1000`` never trained on):

1. the labelling loop as a user walks it: ``export-slices --n 4`` of the training phantom,
   paint them (here: from the phantom's truth, as RGB PNGs in the colour table),
   ``import-masks --like``, ``train`` (supervised-only, ``configs/cpu_tiny_supervised.yaml``,
   120 iterations, so that the labelled slices are all the model learns from);
2. ``suggest-slices --n 4 --labels`` with that model, export, paint and import the 4
   suggested slices next to the first 4; and, as the control, 4 more slices evenly spaced
   between the first 4 (each the unlabelled slice farthest from every labelled one);
3. retrain from scratch on each set of 8 (same seed, config and iterations) and
   ``segment-volume`` + ``evaluate`` the test phantom with every model (mIoU).

Every step is the CLI subcommand a user would type, run in-process; the commands are written to
the results file. Finished steps are skipped when run again on the same ``--workdir``.

    nice -n 19 .venv/bin/python benchmarks/bench_suggest.py   # 3 seeds, <= 20 min, 2 cores
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from magseg_hpc.cli import main as cli_main
from magseg_hpc.data.labelling import read_slice_list

ROOT = Path(__file__).resolve().parents[1]
VAL_SEED_OFFSET, TEST_SEED_OFFSET = 500, 1000
# One torch thread: on a loaded 2-core machine two threads wait on each other. A faster EMA
# teacher (what best.pt holds) for short runs, as in the phantom benchmark's longer runs.
DEFAULT_OVERRIDES = ("train.threads=1", "train.ema_decay=0.95")
ARMS = (("initial", "4 evenly spaced (first model)"), ("even", "+4 evenly spaced"),
        ("suggested", "+4 suggested"))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", default="0,1,2", help="training seeds (default 0,1,2)")
    p.add_argument("--shape", default="48,96,96", help="phantom shape Z,Y,X (default 48,96,96)")
    p.add_argument("--snr", default="2", help="phantom SNR (default 2)")
    p.add_argument("--iters", type=int, default=120, help="training iterations (default 120)")
    p.add_argument("--n-initial", type=int, default=4, help="first labelled slices (default 4)")
    p.add_argument("--n-more", type=int, default=4, help="slices added (default 4)")
    p.add_argument("--n-val", type=int, default=8,
                   help="validation slices of the validation phantom (default 8)")
    p.add_argument("--score", default="entropy", choices=("entropy", "margin"))
    p.add_argument("--config", default="configs/cpu_tiny_supervised.yaml",
                   help="training config (default: supervised-only, so the labelled slices "
                   "are all the model learns from)")
    p.add_argument("--train-override", action="append", default=None, metavar="KEY=VALUE",
                   help="config override, repeatable (default: " + " ".join(DEFAULT_OVERRIDES)
                   + ")")
    p.add_argument("--workdir", default="runs/bench_suggest")
    p.add_argument("--out", default="benchmarks/results/suggest.md")
    args = p.parse_args(argv)
    if args.train_override is None:
        args.train_override = list(DEFAULT_OVERRIDES)
    return args


def run_cli(argv: list, log: list[str], done: bool = False) -> None:
    argv = [str(a) for a in argv]
    line = "magseg-hpc " + shlex.join(argv)
    log.append(line)
    if done:
        return
    print(f"\n$ {line}", flush=True)
    code = cli_main(argv)
    if code:
        raise SystemExit(f"step failed with exit code {code}: {line}")


def paint(volume: Path, shots: Path, masks: Path) -> list[int]:
    """Paint every exported slice from the phantom's truth: RGB PNGs in the colour table,
    named like the slice. Returns the painted indices."""
    import xarray as xr
    from PIL import Image

    manifest = json.loads((shots / "manifest.json").read_text())
    colors = np.asarray(manifest["class_table"]["colors"], np.uint8)
    truth = xr.open_zarr(volume)["labels"]
    masks.mkdir(parents=True, exist_ok=True)
    for i, name in zip(manifest["indices"], manifest["files"], strict=True):
        labels = np.asarray(truth.isel({manifest["axis"]: i}).values)
        Image.fromarray(colors[labels], "RGB").save(masks / (Path(name).stem + ".png"))
    return manifest["indices"]


def farthest(labelled: list[int], size: int, n: int) -> list[int]:
    """``n`` unlabelled slices, each the farthest from every labelled or picked slice."""
    taken = list(labelled)
    picks = []
    for _ in range(n):
        dist = [min(abs(i - j) for j in taken) if i not in taken else -1 for i in range(size)]
        best = int(np.argmax(dist))
        picks.append(best)
        taken.append(best)
    return sorted(picks)


def summarise(values: list[float]) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.3f} (n=1)"
    return f"{statistics.fmean(values):.3f} ± {statistics.stdev(values):.3f} (n={len(values)})"


def commit() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True,
                              capture_output=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=ROOT, text=True, capture_output=True).stdout.strip()
        return head + (" (with uncommitted changes)" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def write_table(args, results: dict, slices: dict, commands: list[str], timings: dict) -> str:
    seeds = args.seeds.split(",")
    rows = ["| seed | " + " | ".join(name for _, name in ARMS)
            + " | suggested - even | suggested slices | even slices |",
            "|" + "---|" * (len(ARMS) + 4)]
    deltas = []
    for seed in seeds:
        cells = [results.get((arm, seed)) for arm, _ in ARMS]
        sug, even = results.get(("suggested", seed)), results.get(("even", seed))
        delta = None if sug is None or even is None else sug - even
        if delta is not None:
            deltas.append(delta)
        rows.append(f"| {seed} | " + " | ".join("-" if c is None else f"{c:.3f}" for c in cells)
                    + f" | {'-' if delta is None else f'{delta:+.3f}'} | "
                    f"{slices.get(('suggested', seed), '-')} | {slices.get(('even', seed), '-')} |")
    rows.append("| mean ± sd | " + " | ".join(
        summarise([results[(arm, s)] for s in seeds if (arm, s) in results]) for arm, _ in ARMS)
        + f" | {summarise(deltas)} | | |")
    md = [
        "# Suggestion benchmark: 4 suggested vs 4 evenly spaced extra slices",
        "",
        f"mIoU on held-out test phantoms (seed + {TEST_SEED_OFFSET}). Each seed: a model "
        f"trained on {args.n_initial} evenly spaced labelled slices of the training phantom; "
        f"then {args.n_more} more slices from `suggest-slices` (score: {args.score}) or "
        f"{args.n_more} more evenly spaced between the first ones, each model retrained from "
        "scratch with the same seed and settings. Validation (best.pt) on "
        f"{args.n_val} slices of a separate phantom (seed + {VAL_SEED_OFFSET}).",
        "",
        f"Settings: shape {args.shape}, SNR {args.snr}, config {args.config}, "
        f"train.max_iters {args.iters}, overrides {args.train_override or 'none'}.",
        f"Commit {args.commit} (when the benchmark started).",
        "",
        *rows,
        "",
        "Wall time of this invocation (s): "
        + ", ".join(f"{k} {v:.0f}" for k, v in sorted(timings.items())),
        "",
        "Command: `" + shlex.join(["nice", "-n", "19", ".venv/bin/python",
                                   "benchmarks/bench_suggest.py", *sys.argv[1:]]) + "`",
        "",
        "Steps (a step whose output already existed in the work dir was skipped):",
        "",
        "```",
        *commands,
        "```",
        "",
    ]
    text = "\n".join(md)
    out = ROOT / args.out if not Path(args.out).is_absolute() else Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    return text


def run_seed(args, seed: str, work: Path, commands: list, results: dict, slices: dict,
             timings: dict) -> None:
    """The whole loop for one seed: label 4, train, suggest 4 / add 4 evenly, retrain."""
    size = int(args.shape.split(",")[0])
    cluster = ["--in-process", "--workers", "1", "--threads-per-worker", "1",
               "--dashboard-address", "127.0.0.1:0"]
    d = work / f"seed{seed}"
    d.mkdir(exist_ok=True)
    vols = {"train": d / "train.zarr", "val": d / "val.zarr", "test": d / "test.zarr"}
    offsets = {"train": 0, "val": VAL_SEED_OFFSET, "test": TEST_SEED_OFFSET}
    for name, path in vols.items():
        run_cli(["make-phantom", path, "--seed", int(seed) + offsets[name], "--snr",
                 args.snr, "--shape", args.shape], commands, done=path.exists())

    def label(arm: str, export_args: list, base: Path | None) -> Path:
        """export -> paint -> import-masks (with the masks of ``base`` too)."""
        shots, masks = d / f"shots_{arm}", d / f"masks_{arm}"
        labels = d / f"labels_{arm}.zarr"
        run_cli(["export-slices", vols["train"], shots, *export_args], commands,
                done=shots.exists())
        if not labels.exists():
            if base is not None:
                shutil.copytree(base, masks, dirs_exist_ok=True)
            paint(vols["train"], shots, masks)
        run_cli(["import-masks", masks, labels, "--colors", shots / "manifest.json",
                 "--like", vols["train"]], commands, done=labels.exists())
        return labels

    def train_and_score(arm: str, labels: Path) -> Path:
        run_dir = d / f"train_{arm}"
        t0 = time.perf_counter()
        run_cli(["train", "--config", args.config, "--output-dir", run_dir, f"seed={seed}",
                 f"data.volume={vols['train']}", f"data.label_volume={labels}",
                 f"data.val_volume={vols['val']}", f"data.n_val={args.n_val}",
                 f"train.max_iters={args.iters}", *args.train_override], commands)
        timings[f"train {arm}/seed{seed}"] = time.perf_counter() - t0
        seg, report = d / f"segmented_{arm}.zarr", d / f"eval_{arm}.json"
        run_cli(["segment-volume", vols["test"], seg, "--model", run_dir / "best.pt",
                 *cluster], commands, done=seg.exists())
        run_cli(["evaluate", seg, vols["test"], "--report", report], commands,
                done=report.is_file())
        results[(arm, seed)] = float(json.loads(report.read_text())["miou"])
        write_table(args, results, slices, commands, timings)
        return run_dir

    first = label("initial", ["--n", args.n_initial], None)
    first_masks = d / "masks_initial"
    run0 = train_and_score("initial", first)
    initial = sorted(int(f.stem[1:]) for f in first_masks.glob("z*.png"))

    suggestions = d / "suggestions.txt"
    t0 = time.perf_counter()
    run_cli(["suggest-slices", vols["train"], "--model", run0 / "best.pt", "--n",
             args.n_more, "--labels", first, "--score", args.score, "-o", suggestions,
             *cluster], commands, done=suggestions.exists())
    timings[f"suggest/seed{seed}"] = time.perf_counter() - t0
    suggested, _ = read_slice_list(suggestions)
    even = farthest(initial, size, args.n_more)
    slices[("suggested", seed)] = ",".join(map(str, sorted(suggested)))
    slices[("even", seed)] = ",".join(map(str, even))

    labels = label("suggested", ["--suggestions", suggestions], first_masks)
    train_and_score("suggested", labels)
    labels = label("even", ["--slices", ",".join(map(str, even))], first_masks)
    train_and_score("even", labels)


def main(argv=None) -> int:
    args = parse_args(argv)
    args.commit = commit()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    commands: list[str] = []
    results: dict = {}
    slices: dict = {}
    timings: dict = {}
    t_all = time.perf_counter()

    for seed in args.seeds.split(","):
        run_seed(args, seed, work, commands, results, slices, timings)
    timings["total"] = time.perf_counter() - t_all
    text = write_table(args, results, slices, commands, timings)
    print("\n" + text.split("\nWall time")[0])
    return 0


if __name__ == "__main__":
    sys.exit(main())
