"""magseg-hpc train --config FILE --output-dir DIR [key=value ...]: AugSeg or supervised training.

Runs unchanged as one process, under torchrun (one process per GPU) or as a submitit task:
the distributed world comes from the environment. Started again on the same output dir it
resumes from checkpoint.pt.
"""

from __future__ import annotations

import json


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
    p.add_argument("--config", required=True, help="experiment YAML (see configs/)")
    p.add_argument("--output-dir", required=True, help="run directory (created; resumed if it "
                   "already holds a checkpoint of the same experiment)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="config overrides with dotted keys, e.g. train.max_iters=100 seed=1")
    p.set_defaults(func=run)


def run(args) -> int:
    from magseg_hpc.config import load_config
    from magseg_hpc.train import run_training

    cfg = load_config(args.config, args.overrides)
    summary = run_training(cfg, args.output_dir)
    if summary.get("rank", 0) == 0:
        print(json.dumps(summary, indent=2))
    return 0
