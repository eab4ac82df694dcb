"""Bit-identical resume where it is hardest: across an epoch boundary, with an EMA teacher
(decay > 0), and across the end of the supervised-only epochs (issue #10)."""

from __future__ import annotations

import torch
from conftest import TINY_MODEL

from magseg_hpc.config import config_from_dict
from magseg_hpc.data.phantom import make_phantom, write_phantom
from magseg_hpc.train import run_training


def _cfg(volume, max_iters: int) -> dict:
    """12 slices: 2 validation, 3 labelled, 7 unlabelled -> 3 iterations per epoch at batch 2;
    epoch 0 is supervised-only, so iterations 4.. run the unsupervised branch; the EMA decay
    stays 0 through epoch sup_only_epochs (1) and is > 0 from iteration 7 on."""
    return {
        "name": "resume-epochs", "seed": 3, "model": TINY_MODEL,
        "data": {"volume": str(volume), "n_labeled": 3, "n_val": 2},
        "train": {"batch_size": 2, "crop_size": 32, "epochs": 3, "max_iters": max_iters,
                  "sup_only_epochs": 1, "ema_decay": 0.9, "threshold": 0.5,
                  "checkpoint_every": 100, "eval_every": 100, "log_every": 1, "lr": 0.01,
                  "device": "cpu", "threads": 1},
    }


def test_resume_across_epoch_and_supervised_only_boundary(tmp_path):
    volume = tmp_path / "phantom.zarr"
    write_phantom(volume, make_phantom((12, 32, 32), seed=2, n_angles=20))
    straight = run_training(config_from_dict(_cfg(volume, 8)), tmp_path / "straight")
    out = tmp_path / "resumed"
    first = run_training(config_from_dict(_cfg(volume, 2)), out)  # stops inside epoch 0
    assert first["iterations"] == 2 and first["iterations_per_epoch"] == 3
    second = run_training(config_from_dict(_cfg(volume, 8)), out)  # through epochs 1 and 2
    assert second["iterations"] == 8 and second["iterations_this_run"] == 6
    assert second["student_digest"] == straight["student_digest"]
    assert second["teacher_digest"] == straight["teacher_digest"]
    a = torch.load(tmp_path / "straight" / "checkpoint.pt", weights_only=True)
    b = torch.load(out / "checkpoint.pt", weights_only=True)
    for which in ("student", "teacher"):
        for key in a[which]:
            assert torch.equal(a[which][key], b[which][key]), (which, key)
    # the resumed part really ran the unsupervised branch with a moving teacher
    import json

    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert [r["iteration"] for r in steps] == [1, 2, 3, 4, 5, 6, 7, 8]
    assert all(r["ema_decay"] > 0 for r in steps if r["iteration"] > 6)
    assert any(r["loss_uns"] > 0 for r in steps if r["iteration"] > 3)
