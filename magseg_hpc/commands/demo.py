"""magseg-hpc demo OUT_DIR: the main job end to end on a built-in default, no SLURM or GPU.

A phantom volume to train on and a second one (another seed) to test on, AugSeg trained on
CPU with the recommended recipe (configs/cpu_best.yaml: 8 labelled slices; a third of its
schedule, 1000 of its 3000 iterations, about 5 minutes on 2 cores), segment-volume on a local
Dask cluster (the trained model along the planes its training's fusion check chose, and the
classical threshold baseline), and the evaluation of both against the test phantom's ground
truth, compared at the end. Each step is the same subcommand a user would type, printed before
it runs.
"""

from __future__ import annotations

import json
import shlex
import shutil
import time
from pathlib import Path

from magseg_hpc.cli import main
from magseg_hpc.config import config_path, load_config
from magseg_hpc.errors import MagsegError

# Everything the demo writes in its folder: only such a folder is replaced by --overwrite.
DEMO_ENTRIES = {"phantom_train.zarr", "phantom_test.zarr", "train", "segmented.zarr",
                "threshold.zarr", "eval_model.json", "eval_threshold.json", "figures_model"}


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
    p.add_argument("--preset", default="elongated",
                   help="make-phantom preset (default elongated; sweep for an 8-bit masked "
                   "volume like a published reconstruction)")
    p.add_argument("--shape", default=None, help="phantom shape Z,Y,X (default the preset's)")
    p.add_argument("--snr", default=None, help="phantom signal-to-noise ratio (default the "
                   "preset's: 2 for elongated)")
    p.add_argument("--overwrite", action="store_true", help="start again in an existing OUT_DIR")
    p.set_defaults(func=run)


def run(args) -> int:
    out = Path(args.output_dir)
    args.config = str(config_path(args.config))  # refused here, before OUT_DIR is touched
    if not Path(args.config).is_file():
        raise MagsegError(f"config {args.config} is not a file; give a config file or the name "
                          "of a shipped one (magseg-hpc configs)")
    if out.exists() and not out.is_dir():
        raise MagsegError(f"{out} is {'a regular file' if out.is_file() else 'not a folder'}; "
                          "give a folder for the demo")
    if out.exists() and any(out.iterdir()):
        foreign = sorted(p.name for p in out.iterdir() if p.name not in DEMO_ENTRIES
                         and not any(p.name.startswith(f".{e}.") for e in DEMO_ENTRIES))
        if foreign:
            raise MagsegError(
                f"{out} holds files the demo did not write ({', '.join(foreign[:3])}"
                f"{' ...' if len(foreign) > 3 else ''}); choose another folder for the demo"
            )
        if not args.overwrite:
            raise MagsegError(f"{out} already exists; pass --overwrite to start the demo again")
        shutil.rmtree(out)
    train, test = out / "phantom_train.zarr", out / "phantom_test.zarr"
    phantom = ["--preset", args.preset]
    phantom += ["--shape", args.shape] if args.shape else []
    phantom += ["--snr", args.snr] if args.snr else []
    schedule = _schedule(args.config, args.iters)
    steps = [
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
    start = time.perf_counter()
    for i, (title, argv) in enumerate(steps, 1):
        argv = [str(a) for a in argv]
        print(f"\n== [{i}/{len(steps)}] {title}\n$ magseg-hpc {shlex.join(argv)}", flush=True)
        code = main(argv)
        if code:
            print(f"demo stopped: step {i} failed with exit code {code}")
            return code
    print(f"\ndemo finished in {time.perf_counter() - start:.0f} s; everything is in {out}/")
    model, baseline = (json.loads((out / f"eval_{name}.json").read_text())["miou"]
                       for name in ("model", "threshold"))
    verdict = "beats" if model > baseline else "does NOT beat"
    print(f"held-out test phantom: model mIoU {model:.3f} {verdict} the threshold baseline "
          f"{baseline:.3f} ({model - baseline:+.3f})")
    return 0


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
