"""Phantom benchmark: the threshold baseline against supervised-only and AugSeg, per preset.

For each phantom preset and each seed ``s``:

1. a training phantom (``--seed s``) and a test phantom of ANOTHER seed (``1000 + s``), same
   preset; models never see the test volume (``best.pt`` is picked on the last ``n_val``
   slices of the training volume);
2. ``magseg-hpc train`` with ``configs/cpu_best_supervised.yaml`` (labelled slices only) and
   ``configs/cpu_best.yaml`` (AugSeg: the same labelled slices plus every unlabelled one),
   same seed, splits, schedule and EMA teacher (the recommended CPU recipe: 2.5D context,
   slices along z, y and x, foreground crops); ``best.pt`` (the teacher) is scored;
3. ``magseg-hpc segment-volume`` of the test phantom: the threshold baseline, and each model
   along z alone and with orthoplane fusion (``--axes z,y,x``; what ``--axes auto`` does
   when the training's fusion check found fusion better);
4. ``magseg-hpc evaluate`` of each against the test phantom's truth (mIoU).

``--ablations`` adds, on the first seed, AugSeg without the recipe's parts (plain 2D, z only)
and with 2.5D but z only; ``--ceiling`` adds, on the first seed, a supervised model trained on
every training slice labelled, twice as long: the headroom above the 8-slice models.

Every step is the CLI subcommand a user would type (run in-process through
``magseg_hpc.cli.main``); commands are printed and written to the results file. Finished
steps are skipped when the script runs again on the same ``--workdir``, and the table is
rewritten after every evaluation, so an interrupted run still leaves results.

    .venv/bin/python benchmarks/bench_phantom.py                 # presets x 3 seeds
    .venv/bin/python benchmarks/bench_phantom.py --seeds 0 --ablations --ceiling
    .venv/bin/python benchmarks/bench_phantom.py --presets sweep --seeds 0 \
        --shape 213,600,600 --out benchmarks/results/phantom_realsize.md   # a real sweep's size
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import statistics
import sys
import time
from pathlib import Path

from _results import commit, machine, machine_line

from magseg_hpc.cli import main as cli_main

ROOT = Path(__file__).resolve().parents[1]
TEST_SEED_OFFSET = 1000
# column -> heading, in table order
COLUMNS = {
    "threshold": "threshold baseline",
    "supervised": "supervised-only, z",
    "supervised_fused": "supervised-only, z,y,x fused",
    "augseg": "AugSeg, z",
    "augseg_fused": "AugSeg, z,y,x fused (cpu_best as segment-volume uses it)",
    "augseg_2d": "AugSeg, plain 2D, z only",
    "augseg_25d_z": "AugSeg, 2.5D, z only",
    "ceiling": "ceiling: all slices labelled, z",
    "ceiling_fused": "ceiling: all slices labelled, z,y,x fused",
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--presets", default="elongated,sweep",
                   help="make-phantom presets (default elongated,sweep)")
    p.add_argument("--seeds", default="0,1,2", help="training seeds; test phantoms use "
                   f"seed + {TEST_SEED_OFFSET} (default 0,1,2)")
    p.add_argument("--snr", default=None, help="override the presets' SNR")
    p.add_argument("--shape", default=None, metavar="Z,Y,X",
                   help="override the presets' volume shape (e.g. 213,600,600: a real sweep)")
    p.add_argument("--encoding", default=None, help="make-phantom --encoding of the training "
                   "and test phantoms (default the preset's): the same sample in another "
                   "encoding, for a table per encoding")
    p.add_argument("--only", choices=("augseg", "supervised"), default=None,
                   help="train this model only (default both)")
    p.add_argument("--n-labeled", type=int, default=8, help="labelled slices (default 8)")
    p.add_argument("--augseg-config", default="configs/cpu_best.yaml")
    p.add_argument("--supervised-config", default="configs/cpu_best_supervised.yaml")
    p.add_argument("--train-override", action="append", default=[], metavar="KEY=VALUE",
                   help="extra config override for every training (repeatable)")
    p.add_argument("--ablations", action="store_true", help="2D and z-only AugSeg, first seed")
    p.add_argument("--ceiling", action="store_true",
                   help="supervised on every slice labelled, first seed")
    p.add_argument("--workdir", default="runs/bench_phantom")
    p.add_argument("--out", default="benchmarks/results/phantom.md")
    p.add_argument("--readme", action="store_true",
                   help="also replace the tables between the README's bench_phantom markers")
    return p.parse_args(argv)


def run_cli(argv: list, log: list[str], done: bool = False) -> None:
    """Run one subcommand in-process; ``done``: its output exists, only list the command."""
    argv = [str(a) for a in argv]
    line = "magseg-hpc " + shlex.join(argv)
    log.append(line)
    if done:
        return
    print(f"\n$ {line}", flush=True)
    code = cli_main(argv)
    if code:
        raise SystemExit(f"step failed with exit code {code}: {line}")


def evaluate(pred: Path, truth: Path, report: Path, log: list[str]) -> float:
    run_cli(["evaluate", pred, truth, "--report", report], log, done=report.is_file())
    return float(json.loads(report.read_text())["miou"])


def summarise(values: list[float]) -> str:
    if not values:
        return "-"
    mean = statistics.fmean(values)
    if len(values) == 1:
        return f"{mean:.3f} (n=1)"
    return f"{mean:.3f} ± {statistics.stdev(values):.3f} (n={len(values)})"


def write_table(args, results: dict, commands: list[str], timings: dict) -> str:
    presets = args.presets.split(",")
    columns = [c for c in COLUMNS if any((p, c) in results for p in presets)]
    rows = ["| preset | " + " | ".join(COLUMNS[c] for c in columns) + " |",
            "|" + "---|" * (len(columns) + 1)]
    for preset in presets:
        cells = [summarise(results.get((preset, c), [])) for c in columns]
        rows.append(f"| {preset} | " + " | ".join(cells) + " |")
    margins = []
    for preset in presets:
        for a, b in (("augseg_fused", "threshold"), ("supervised_fused", "threshold"),
                     ("augseg_fused", "supervised_fused"), ("augseg", "supervised"),
                     ("augseg_fused", "augseg"), ("supervised_fused", "supervised"),
                     ("ceiling_fused", "threshold")):
            diffs = [results[(preset, a, s)] - results[(preset, b, s)]
                     for s in args.seeds.split(",")
                     if (preset, a, s) in results and (preset, b, s) in results]
            if diffs:
                margins.append(f"| {preset} | {COLUMNS[a]} - {COLUMNS[b]} | "
                               f"{summarise(diffs)} | {min(diffs):+.3f} |")
    per_seed = ["| preset | seed | " + " | ".join(columns) + " |",
                "|" + "---|" * (len(columns) + 2)]
    for preset in presets:
        for seed in args.seeds.split(","):
            cells = [results.get((preset, c, seed)) for c in columns]
            per_seed.append(f"| {preset} | {seed} | " + " | ".join(
                "-" if c is None else f"{c:.3f}" for c in cells) + " |")
    md = [
        "# Phantom benchmark",
        "",
        f"mIoU on held-out test phantoms (seed + {TEST_SEED_OFFSET}; never a training volume), "
        "mean ± sample standard deviation over training seeds.",
        "",
        f"Commit {args.commit} (the code this process imported). Presets {args.presets}, "
        f"seeds {args.seeds}, encoding {args.encoding or 'of the preset'}, shape "
        f"{args.shape or 'of the preset'}, SNR "
        f"{args.snr or 'of the preset'}, {args.n_labeled} labelled slices, configs "
        f"{args.augseg_config} and {args.supervised_config}, overrides "
        f"{args.train_override or 'none'}.",
        "",
        machine_line(machine()),
        "",
        *rows,
        "",
        "Margins, paired by seed (mean ± sd, and the worst seed):",
        "",
        "| preset | difference | mean | worst |",
        "|---|---|---|---|",
        *margins,
        "",
        "Per seed:",
        "",
        *per_seed,
        "",
        "Training wall time (s; the longest of the runs that trained it, one core each): "
        + ", ".join(f"{k} {v:.0f}" for k, v in sorted(timings.items())),
        "",
        "Reproduce: `" + shlex.join([".venv/bin/python", "benchmarks/bench_phantom.py",
                                     *sys.argv[1:]]) + "`",
        "",
        "Commands (in order; a step whose output already existed in the work dir was skipped):",
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


README_MARKERS = ("<!-- bench_phantom tables: begin -->", "<!-- bench_phantom tables: end -->")


def update_readme(text: str) -> None:
    """The README's copy of the mean and margin tables, taken from the results text."""
    readme = ROOT / "benchmarks" / "README.md"
    body = readme.read_text()
    begin, end = README_MARKERS
    if begin not in body or end not in body:
        raise SystemExit(f"README.md lacks the markers {begin} ... {end}")
    tables = text[text.index("| preset |"):text.index("\nPer seed:")].strip()
    head, rest = body.split(begin, 1)
    body = head + begin + "\n" + tables + "\n" + end + rest.split(end, 1)[1]
    readme.write_text(body)


def ceiling_overrides(config: str, train_vol: Path) -> list[str]:
    """Every training slice labelled (all but the validation block), twice the epochs."""
    from magseg_hpc.config import load_config
    from magseg_hpc.volume.io import open_volume

    cfg = load_config(ROOT / config, [f"data.volume={train_vol}"])
    n_slices = open_volume(str(train_vol), "image").shape[0]
    return [f"data.n_labeled={n_slices - cfg.data.n_val}", f"train.epochs={2 * cfg.train.epochs}"]


def main(argv=None) -> int:
    args = parse_args(argv)
    args.commit = commit()  # at the start: the code that runs is the code imported now
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    commands: list[str] = []
    results: dict = {}
    # Training times survive reruns: a run resumed at its end only costs its start-up.
    timings_file = work / "train_seconds.json"
    timings: dict = json.loads(timings_file.read_text()) if timings_file.exists() else {}
    first_seed = args.seeds.split(",")[0]

    def record(preset: str, column: str, seed: str, miou: float) -> None:
        results.setdefault((preset, column), []).append(miou)
        results[(preset, column, seed)] = miou
        with (work / "results.jsonl").open("a") as f:
            f.write(json.dumps({"preset": preset, "column": column, "seed": seed,
                                "miou": miou, "time": time.time()}) + "\n")
        write_table(args, results, commands, timings)

    for preset in args.presets.split(","):
        for seed in args.seeds.split(","):
            d = work / f"{preset}_seed{seed}"
            d.mkdir(exist_ok=True)
            train_vol, test_vol = d / "train.zarr", d / "test.zarr"
            flags = (["--snr", args.snr] if args.snr else []) + (
                ["--shape", args.shape] if args.shape else []) + (
                ["--encoding", args.encoding] if args.encoding else [])
            for path, s in ((train_vol, seed), (test_vol, str(int(seed) + TEST_SEED_OFFSET))):
                run_cli(["make-phantom", path, "--preset", preset, "--seed", s, *flags],
                        commands, done=path.exists())
            seg = d / "threshold.zarr"
            run_cli(["segment-volume", test_vol, seg, "--method", "threshold", "--in-process"],
                    commands, done=seg.exists())
            record(preset, "threshold", seed, evaluate(seg, test_vol, d / "eval_threshold.json",
                                                       commands))

            # (column, config, overrides, [(column, axes), ...] to segment)
            runs = [
                ("supervised", args.supervised_config, [],
                 [("supervised", "z"), ("supervised_fused", "z,y,x")]),
                ("augseg", args.augseg_config, [],
                 [("augseg", "z"), ("augseg_fused", "z,y,x")]),
            ]
            runs = [r for r in runs if args.only in (None, r[0])]
            if args.ablations and seed == first_seed:
                runs += [
                    ("augseg_2d", args.augseg_config,
                     ["model.context_slices=1", "data.axes=[z]"], [("augseg_2d", "z")]),
                    ("augseg_25d_z", args.augseg_config, ["data.axes=[z]"],
                     [("augseg_25d_z", "z")]),
                ]
            if args.ceiling and seed == first_seed:
                runs.append(("ceiling", args.supervised_config, ceiling_overrides(
                    args.supervised_config, train_vol),
                    [("ceiling", "z"), ("ceiling_fused", "z,y,x")]))
            for name, config, overrides, segments in runs:
                run_dir = d / f"train_{name}"
                extra = [] if name == "ceiling" else [f"data.n_labeled={args.n_labeled}"]
                t0 = time.perf_counter()
                run_cli(["train", "--config", config, "--output-dir", run_dir,
                         f"seed={seed}", f"data.volume={train_vol}", *extra, *overrides,
                         *args.train_override], commands)
                key = f"{name}/{preset}/seed{seed}"
                timings[key] = max(timings.get(key, 0.0), time.perf_counter() - t0)
                timings_file.write_text(json.dumps(timings, indent=1))
                for column, axes in segments:
                    seg = d / f"{column}.zarr"
                    run_cli(["segment-volume", test_vol, seg, "--model", run_dir / "best.pt",
                             "--axes", axes, "--in-process"], commands, done=seg.exists())
                    record(preset, column, seed, evaluate(seg, test_vol,
                                                          d / f"eval_{column}.json", commands))
    text = write_table(args, results, commands, timings)
    if args.readme:
        update_readme(text)
    print("\n" + text.split("\nPer seed:")[0])
    bad = [k for k, v in results.items() if isinstance(v, float) and not math.isfinite(v)]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
