"""Phantom benchmark: the threshold baseline, supervised-only, AugSeg and orthoplane fusion.

For each SNR and each seed ``s``:

1. a training phantom (``--seed s``) and a test phantom of ANOTHER seed (``1000 + s``), both
   with the same shading and SNR; models never see the test volume (their validation slices,
   used to pick ``best.pt``, are the last ``n_val`` slices of the training volume);
2. ``magseg-hpc train`` with ``configs/cpu_tiny_supervised.yaml`` (labelled slices only) and
   with ``configs/cpu_tiny.yaml`` (AugSeg: the same labelled slices plus the unlabelled rest),
   same ``seed=s``, same splits, same iterations;
3. ``magseg-hpc segment-volume`` on the test phantom: threshold baseline, each model along z,
   and the AugSeg model with orthoplane fusion (``--axes z,y,x``);
4. ``magseg-hpc evaluate`` of each against the test phantom's truth (mIoU).

Also the threshold baseline on the same test phantoms without shading (``shading=0``), to show
what shading costs it. Every step is the CLI subcommand a user would type (run in-process
through ``magseg_hpc.cli.main``); the commands are printed and written to the results file.
Finished steps are skipped when the script is run again on the same ``--workdir``, and the
table is rewritten after every evaluation, so an interrupted run still leaves results.

CPU defaults (2 cores; about 15 minutes when the cores are quiet, 3 SNRs x 3 seeds):

    .venv/bin/python benchmarks/bench_phantom.py

The original study's settings on a GPU (128 labelled slices, a full-size phantom, more
iterations), for example:

    .venv/bin/python benchmarks/bench_phantom.py --shape 256,256,256 --n-labeled 128 \\
        --n-val 16 --iters 6000 --seeds 0,1,2 --workdir runs/bench_phantom_gpu \\
        --out benchmarks/results/phantom_gpu.md \\
        --train-override model.backbone=resnet101 --train-override train.crop_size=256
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

from magseg_hpc.cli import main as cli_main

ROOT = Path(__file__).resolve().parents[1]
METHODS = (
    ("threshold", "threshold baseline"),
    ("supervised", "supervised-only"),
    ("augseg", "AugSeg"),
    ("augseg_fused", "AugSeg + orthoplane fusion (z,y,x)"),
    ("threshold_noshade", "threshold, test volume without shading"),
)
TEST_SEED_OFFSET = 1000


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--snrs", default="4,2,1", help="comma-separated SNRs (default 4,2,1)")
    p.add_argument("--seeds", default="0,1,2", help="training seeds; test phantoms use "
                   f"seed + {TEST_SEED_OFFSET} (default 0,1,2)")
    p.add_argument("--iters", type=int, default=240, help="training iterations (default 240)")
    p.add_argument("--shape", default="48,96,96", help="phantom shape Z,Y,X (default 48,96,96)")
    p.add_argument("--shading", type=float, default=0.3, help="phantom shading (default 0.3)")
    p.add_argument("--n-labeled", type=int, default=8, help="labelled slices (default 8)")
    p.add_argument("--n-val", type=int, default=8,
                   help="validation slices at the end of the training volume (default 8)")
    p.add_argument("--augseg-config", default="configs/cpu_tiny.yaml")
    p.add_argument("--supervised-config", default="configs/cpu_tiny_supervised.yaml")
    p.add_argument("--train-override", action="append", default=[], metavar="KEY=VALUE",
                   help="extra config override for both trainings (repeatable)")
    p.add_argument("--workdir", default="runs/bench_phantom")
    p.add_argument("--out", default="benchmarks/results/phantom.md")
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


def last_iteration(run_dir: Path) -> int:
    """Iterations the run really did: train.max_iters caps train.epochs x iterations/epoch."""
    last = 0
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        last = max(last, int(json.loads(line).get("iteration", 0)))
    return last


def write_table(args, results: dict, commands: list[str], timings: dict,
                iterations: set[int]) -> str:
    snrs = [s for s in args.snrs.split(",")]
    head = "| SNR | " + " | ".join(name for _, name in METHODS) + " |"
    rows = [head, "|" + "---|" * (len(METHODS) + 1)]
    for snr in snrs:
        cells = [summarise(results.get((snr, m), [])) for m, _ in METHODS]
        rows.append(f"| {snr} | " + " | ".join(cells) + " |")
    per_seed = ["| SNR | seed | " + " | ".join(m for m, _ in METHODS) + " |",
                "|" + "---|" * (len(METHODS) + 2)]
    for snr in snrs:
        for seed in args.seeds.split(","):
            cells = [results.get((snr, m, seed)) for m, _ in METHODS]
            per_seed.append(f"| {snr} | {seed} | " + " | ".join(
                "-" if c is None else f"{c:.3f}" for c in cells) + " |")
    md = [
        "# Phantom benchmark",
        "",
        f"mIoU on held-out test phantoms (seed + {TEST_SEED_OFFSET}; never a training volume), "
        "mean ± sample standard deviation over training seeds.",
        "",
        f"Settings: shape {args.shape}, shading {args.shading}, {args.n_labeled} labelled "
        f"slices, {args.n_val} validation slices (end of the training volume), "
        f"train.max_iters {args.iters} (iterations run: "
        f"{', '.join(map(str, sorted(iterations))) or 'none yet'}), seeds {args.seeds}, "
        f"configs {args.supervised_config} and "
        f"{args.augseg_config}, overrides {args.train_override or 'none'}.",
        "",
        *rows,
        "",
        "Per seed:",
        "",
        *per_seed,
        "",
        "Training wall time of this invocation (s; a run finished earlier only costs its "
        "start-up): "
        + ", ".join(f"{k} {v:.0f}" for k, v in sorted(timings.items())),
        "",
        "Reproduce: `" + shlex.join([".venv/bin/python", "benchmarks/bench_phantom.py",
                                     *sys.argv[1:]]) + "`",
        "",
        "Commands (in order; a step whose output already existed in the work dir was skipped, "
        "and `train` on a finished run returns at once):",
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


def main(argv=None) -> int:
    args = parse_args(argv)
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    commands: list[str] = []
    results: dict = {}
    timings: dict = {}
    results_jsonl = work / "results.jsonl"
    iterations: set[int] = set()

    def record(snr: str, method: str, seed: str, miou: float) -> None:
        results.setdefault((snr, method), []).append(miou)
        results[(snr, method, seed)] = miou
        with results_jsonl.open("a") as f:
            f.write(json.dumps({"snr": snr, "method": method, "seed": seed, "miou": miou,
                                "time": time.time()}) + "\n")
        write_table(args, results, commands, timings, iterations)

    phantom_opts = ["--shape", args.shape, "--shading", str(args.shading)]
    for snr in args.snrs.split(","):
        for seed in args.seeds.split(","):
            d = work / f"snr{snr}_seed{seed}"
            d.mkdir(exist_ok=True)
            train_vol, test_vol = d / "train.zarr", d / "test.zarr"
            flat_vol = d / "test_noshade.zarr"
            test_seed = str(int(seed) + TEST_SEED_OFFSET)
            for path, s, shade in ((train_vol, seed, phantom_opts),
                                   (test_vol, test_seed, phantom_opts),
                                   (flat_vol, test_seed, ["--shape", args.shape,
                                                          "--shading", "0"])):
                run_cli(["make-phantom", path, "--seed", s, "--snr", snr, *shade], commands,
                        done=path.exists())

            for vol, method in ((test_vol, "threshold"), (flat_vol, "threshold_noshade")):
                seg = d / f"{method}.zarr"
                run_cli(["segment-volume", vol, seg, "--method", "threshold", "--in-process"],
                        commands, done=seg.exists())
                record(snr, method, seed, evaluate(seg, vol, d / f"eval_{method}.json",
                                                   commands))

            for method, config in (("supervised", args.supervised_config),
                                   ("augseg", args.augseg_config)):
                run_dir = d / f"train_{method}"
                best = run_dir / "best.pt"
                # always called: a finished run returns at once, an interrupted one resumes
                t0 = time.perf_counter()
                run_cli(["train", "--config", config, "--output-dir", run_dir,
                         f"seed={seed}", f"data.volume={train_vol}",
                         f"data.n_labeled={args.n_labeled}", f"data.n_val={args.n_val}",
                         f"train.max_iters={args.iters}", *args.train_override], commands)
                timings[f"{method}/snr{snr}/seed{seed}"] = time.perf_counter() - t0
                iterations.add(last_iteration(run_dir))
                variants = [(method, "z")] + ([("augseg_fused", "z,y,x")]
                                              if method == "augseg" else [])
                for name, axes in variants:
                    seg = d / f"{name}.zarr"
                    run_cli(["segment-volume", test_vol, seg, "--model", best, "--axes", axes,
                             "--in-process"], commands, done=seg.exists())
                    record(snr, name, seed, evaluate(seg, test_vol, d / f"eval_{name}.json",
                                                     commands))
    text = write_table(args, results, commands, timings, iterations)
    print("\n" + text.split("\nPer seed:")[0])
    bad = [k for k, v in results.items() if isinstance(v, float) and not math.isfinite(v)]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
