"""magseg-hpc train --config FILE --output-dir DIR [key=value ...]: AugSeg or supervised training.

Runs unchanged as one process, under torchrun (one process per GPU) or as a submitit task:
the distributed world comes from the environment. Started again on the same output dir it
resumes from checkpoint.pt.
"""

from __future__ import annotations

from magseg_hpc.config import load_config
from magseg_hpc.errors import MagsegError
from magseg_hpc.outputs import check_no_overlap, check_output
from magseg_hpc.paths import volume_file
from magseg_hpc.train import run_training


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "train", help="train a segmentation model (AugSeg semi-supervised or supervised)",
        description=(
            "Train on the slices of a volume store or an image folder. Writes config.yaml, "
            "checkpoint.pt (latest), best.pt (best teacher mIoU), metrics.jsonl, curves.png "
            "and logs/rank*.log to the output dir, and resumes from checkpoint.pt when it "
            "exists. Under torchrun every process runs this same command."
        ),
    )
    p.add_argument("--config", required=True,
                   help="experiment config: a YAML path or a shipped config's name "
                   "(magseg-hpc configs)")
    p.add_argument("--output-dir", required=True, help="run directory (created; resumed if it "
                   "already holds a checkpoint of the same experiment)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="config overrides with dotted keys, e.g. train.max_iters=100 seed=1")
    p.set_defaults(func=run)


DATA_PATH_KEYS = ("volume", "label_volume", "val_volume", "val_label_volume", "folder",
                  "labeled_split", "unlabeled_split", "val_split")


def check_run_paths(cfg, output_dir, check_data: bool = True) -> None:
    """The data paths exist, and the run dir is a writable folder outside them (also run by
    submit before anything is submitted; a dry run skips the data)."""
    inputs = [getattr(cfg.data, k) for k in DATA_PATH_KEYS]
    for key in DATA_PATH_KEYS if check_data else ():
        spec = getattr(cfg.data, key)
        if spec and not volume_file(spec).exists():
            raise MagsegError(f"data.{key}: {spec} does not exist; fix the path in the config "
                              f"or override it (data.{key}=PATH)")
    if output_dir is not None:
        check_no_overlap(output_dir, inputs, replaces=False, flag="--output-dir")
        check_output(output_dir, kind="dir", flag="--output-dir")


def run(args) -> int:
    cfg = load_config(args.config, args.overrides)
    check_run_paths(cfg, args.output_dir)
    summary = run_training(cfg, args.output_dir)
    if summary.get("rank", 0) == 0:
        print(human_summary(summary))
    return 0


def human_summary(s: dict) -> str:
    """The end of a training in a few lines; everything else is in summary.json."""
    run = s["output_dir"]
    minutes, seconds = divmod(round(s["seconds"]), 60)
    lines = [f"training {'finished' if s['iterations'] == s['total_iterations'] else 'stopped'}"
             f" at iteration {s['iterations']} of {s['total_iterations']} "
             f"({s['iterations_this_run']} in this run, {minutes} min {seconds} s)"]
    if s["best_teacher_miou"] is not None:
        last = s["last_eval"]
        lines.append(f"validation mIoU: best {s['best_teacher_miou']:.4f} at iteration "
                     f"{s['best_iteration']} (kept in best.pt); last {last['teacher_miou']:.4f}"
                     f" (teacher), {last['student_miou']:.4f} (student) at {last['iteration']}")
    if s["collapses"]:
        worst = max(s["collapses"], key=lambda c: c["drop"])
        lines.append(f"warning: validation collapsed {len(s['collapses'])} time(s), worst "
                     f"{worst['drop']:.3f} below the best at iteration {worst['iteration']}")
    check = s.get("fusion_check")
    if check:
        fused = check["fused_miou"] > check["axis_miou"]
        lines.append(f"fusion check: {check['axis']} alone {check['axis_miou']:.4f}, "
                     f"{','.join(check['axes'])} fused {check['fused_miou']:.4f}: segment-volume "
                     f"--axes auto will use {','.join(check['axes']) if fused else check['axis']}")
    lines.append(f"model: {s['best'] or s['checkpoint']}; curves: {run}/curves.png or "
                 f"tensorboard --logdir {run}; all numbers: {run}/summary.json")
    return "\n".join(lines)
