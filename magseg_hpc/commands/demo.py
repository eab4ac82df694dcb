"""magseg-hpc demo OUT_DIR: the main job end to end on a built-in default, no SLURM or GPU.

A phantom volume to train on and a second one (another seed) to test on, AugSeg trained on
CPU with the recommended recipe (configs/cpu_best.yaml: 8 labelled slices; a third of its
schedule, 1000 of its 3000 iterations, about 5 minutes on 2 cores), segment-volume on a local
Dask cluster (the trained model along the planes its training's fusion check chose, and the
classical threshold baseline), and the evaluation of both against the test phantom's ground
truth, compared at the end. Each step is the same subcommand a user would type, printed before
it runs.

The demo's folder is an output like any other: every argument is checked before anything on
disk is touched; the demo is written into the folder's staging (staging.py) and swapped in
only when every step has succeeded, so a kill or a failing step leaves the previous demo as
it was; its owner manifest (outputs.py) makes it the tool's, and only such a folder is
replaced by --overwrite (a folder the demo did not create is refused, whatever it holds).
"""

from __future__ import annotations

import json
import shlex
import time
from pathlib import Path

from magseg_hpc.cli import main
from magseg_hpc.commands.common import int_triple
from magseg_hpc.commands.make_phantom import check_phantom_args
from magseg_hpc.config import config_path, load_config
from magseg_hpc.data.phantom import PRESETS, preset_params
from magseg_hpc.errors import MagsegError
from magseg_hpc.outputs import record_owner
from magseg_hpc.staging import staged_output
from magseg_hpc.train.setup import check_experiment

DEMO_FORMAT = "magseg-hpc/demo/1"  # the demo folder's owner manifest (outputs.py)
# What the demo writes in its folder (its owner manifest lists them)
DEMO_ENTRIES = ("phantom_train.zarr", "phantom_test.zarr", "train", "segmented.zarr",
                "threshold.zarr", "eval_model.json", "eval_threshold.json", "figures_model")


DEMO_ITERS = 1000  # a third of cpu_best's schedule: a demo in ~5 minutes


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "demo", help="run the whole pipeline on phantoms: make, train, segment, evaluate",
        description=__doc__.split("\n\n")[1],
    )
    p.add_argument("output_dir", nargs="?", default="runs/demo", help="default runs/demo")
    p.add_argument("--config", default="cpu_best",
                   help="training config, a path or a shipped config's name (default cpu_best)")
    p.add_argument("--iters", type=int, default=DEMO_ITERS,
                   help=f"training iterations, as a whole schedule (default {DEMO_ITERS}: about "
                   "5 minutes on 2 cores; cpu_best's own schedule is 3000)")
    p.add_argument("--preset", default="elongated", choices=tuple(PRESETS),
                   help="make-phantom preset (default elongated; sweep for an 8-bit masked "
                   "volume like a published reconstruction)")
    p.add_argument("--shape", type=int_triple, default=None,
                   help="phantom shape Z,Y,X (default the preset's)")
    p.add_argument("--snr", type=float, default=None, help="phantom signal-to-noise ratio "
                   "(default the preset's: 2 for elongated)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the demo in an existing OUT_DIR (one the demo wrote)")
    p.set_defaults(func=run)


def run(args) -> int:
    out = Path(args.output_dir)
    schedule = _check_args(args)  # every argument, before anything on disk is touched
    with staged_output(out, args.overwrite, expect=DEMO_FORMAT) as tmp:
        tmp.mkdir()
        record_owner(tmp, DEMO_FORMAT, DEMO_ENTRIES)  # the tool's from its first entry
        seconds = _run_steps(_steps(args, tmp, schedule), tmp, out)
    print(f"\ndemo finished in {seconds:.0f} s; everything is in {out}/")
    model, baseline = (json.loads((out / f"eval_{name}.json").read_text())["miou"]
                       for name in ("model", "threshold"))
    verdict = "beats" if model > baseline else "does NOT beat"
    print(f"held-out test phantom: model mIoU {model:.3f} {verdict} the threshold baseline "
          f"{baseline:.3f} ({model - baseline:+.3f})")
    return 0


def _check_args(args) -> list[str]:
    """Refuse a bad argument in one line; the training's schedule overrides."""
    args.config = str(config_path(args.config))
    if not Path(args.config).is_file():
        raise MagsegError(f"config {args.config} is not a file; give a config file or the name "
                          "of a shipped one (magseg-hpc configs)")
    schedule = _schedule(args.config, args.iters)
    check_experiment(load_config(args.config, schedule))  # as the training step will
    check_phantom_args(preset_params(args.preset, shape=args.shape, snr=args.snr))
    return schedule


def _steps(args, out: Path, schedule: list[str]) -> list[tuple[str, list]]:
    """(title, magseg-hpc arguments) of each step, writing into ``out``."""
    train, test = out / "phantom_train.zarr", out / "phantom_test.zarr"
    phantom = ["--preset", args.preset]
    phantom += ["--shape", ",".join(map(str, args.shape))] if args.shape else []
    phantom += ["--snr", str(args.snr)] if args.snr is not None else []
    return [
        ("make a training phantom", ["make-phantom", train, "--seed", "0", *phantom]),
        ("make a test phantom (another seed)", ["make-phantom", test, "--seed", "1", *phantom]),
        ("train AugSeg on CPU", [
            "train", "--config", args.config, "--output-dir", out / "train",
            f"data.volume={train}", *schedule,
        ]),
        ("segment the test volume with the model", [
            "segment-volume", test, out / "segmented.zarr", "--model", out / "train" / "best.pt",
            "--dashboard-address", "127.0.0.1:0",
        ]),
        ("segment it with the threshold baseline", [
            "segment-volume", test, out / "threshold.zarr", "--method", "threshold",
            "--dashboard-address", "127.0.0.1:0",
        ]),
        ("evaluate the model", [
            "evaluate", out / "segmented.zarr", test, "--report", out / "eval_model.json",
            "--figures", out / "figures_model",
        ]),
        ("evaluate the baseline", [
            "evaluate", out / "threshold.zarr", test, "--report", out / "eval_threshold.json",
        ]),
    ]


def _run_steps(steps: list[tuple[str, list]], staging: Path, out: Path) -> float:
    """Run each step in this process (printed with the paths it will have in ``out``);
    seconds taken. A failed step stops the demo, and ``out`` stays as it was."""
    start = time.perf_counter()
    for i, (title, argv) in enumerate(steps, 1):
        argv = [str(a) for a in argv]
        shown = [a.replace(str(staging), str(out)) for a in argv]
        print(f"\n== [{i}/{len(steps)}] {title}\n$ magseg-hpc {shlex.join(shown)}", flush=True)
        code = main(argv)
        if code:
            kept = (f"the previous demo in {out} is as it was" if out.exists()
                    else "nothing was kept")
            raise MagsegError(f"demo stopped: step {i} ({title}) failed with exit code {code}; "
                              f"{kept}")
    return time.perf_counter() - start


def _schedule(config: str, iters: int | None) -> list[str]:
    """Overrides for ``--iters``: a whole schedule of that length, not a cut-off one."""
    if iters is None:
        return []
    if iters < 1:
        raise MagsegError(f"--iters must be >= 1, got {iters}")

    per_epoch = load_config(config).train.iters_per_epoch
    if per_epoch is None:
        return [f"train.max_iters={iters}"]
    return [f"train.epochs={max(1, -(-iters // per_epoch))}", f"train.max_iters={iters}"]
