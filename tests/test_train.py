"""Training end to end on tiny phantoms: outputs, supervised mode, resume equality, refusing
another experiment's output dir, a 2-process DDP run on CPU (gloo), the study's folder layout,
and learning something on a phantom. ResNet-18, crops of 32-48, a few iterations each."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import TINY_MODEL

from magseg_hpc.cli import main as cli_main
from magseg_hpc.config import config_from_dict
from magseg_hpc.data.phantom import make_phantom, write_phantom
from magseg_hpc.data.sampling import epoch_plan
from magseg_hpc.data.slices import AugmentSettings, FolderSlices, UnlabeledSlices, VolumeSlices
from magseg_hpc.data.splits import make_splits, read_split
from magseg_hpc.errors import MagsegError
from magseg_hpc.models.checkpoint import load_checkpoint
from magseg_hpc.train import run_training

REPO = Path(__file__).resolve().parents[1]


def tiny(volume, **train) -> dict:
    """16 slices: 2 validation, 3 labelled, 11 unlabelled -> 5 iterations per epoch at batch 2."""
    return {
        "name": "tiny",
        "seed": 0,
        "model": TINY_MODEL,
        "data": {"volume": str(volume), "n_labeled": 3, "n_val": 2},
        "train": {"batch_size": 2, "crop_size": 32, "epochs": 2, "checkpoint_every": 2,
                  "eval_every": 2, "log_every": 1, "lr": 0.01, "ema_decay": 0.99,
                  "device": "cpu", "threads": 1, **train},
    }


@pytest.fixture(scope="module")
def phantom(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "phantom.zarr"
    write_phantom(path, make_phantom((16, 32, 32), seed=0, n_angles=20))
    return path


@pytest.fixture(scope="module")
def straight(phantom, tmp_path_factory) -> tuple[Path, dict]:
    """An uninterrupted AugSeg run of 4 iterations."""
    out = tmp_path_factory.mktemp("straight") / "run"
    return out, run_training(config_from_dict(tiny(phantom, max_iters=4)), out)


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


# --- pieces ----------------------------------------------------------------------------------


def test_make_splits_are_disjoint_and_counted():
    s = make_splits(20, n_labeled=4, n_val=3)
    assert s["val"] == [17, 18, 19] and s["labeled"] == [0, 5, 11, 16]
    assert sorted(s["labeled"] + s["unlabeled"] + s["val"]) == list(range(20))
    r = make_splits(20, n_labeled=4, n_val=3, labeled_selection="random", seed=1)
    assert r == make_splits(20, n_labeled=4, n_val=3, labeled_selection="random", seed=1)
    assert not set(r["labeled"]) & set(r["val"])
    sep = make_splits(20, n_labeled=4, n_val=5, n_val_slices=30)
    assert sep["val"] == [0, 7, 14, 22, 29] and len(sep["unlabeled"]) == 16
    with pytest.raises(MagsegError, match="n_labeled=30"):
        make_splits(20, n_labeled=30)


def test_epoch_plan_shards_identical_orders_and_oversamples_labelled():
    kw = {"n_labeled": 3, "n_unlabeled": 13, "batch_size": 2, "seed": 5, "world_size": 2}
    plans = [epoch_plan(1, rank=r, **kw) for r in (0, 1)]
    assert plans[0].iters == plans[1].iters == 3  # 13 // (2 * 2)
    positions = [p for plan in plans for batch in plan.unlabeled for (_, p, _) in batch]
    assert sorted(positions) == list(range(12))  # each place in the epoch exactly once
    unl = [i for plan in plans for batch in plan.unlabeled for (_, _, i) in batch]
    assert len(set(unl)) == 12  # one pass over the unlabelled set, no repeats
    lab = [i for plan in plans for batch in plan.labeled for (_, _, i) in batch]
    assert sorted(np.bincount(lab, minlength=3)) == [4, 4, 4]  # oversampled evenly
    assert epoch_plan(1, rank=0, **kw) == plans[0]  # a pure function of (seed, epoch, rank)
    assert epoch_plan(2, rank=0, **kw).unlabeled != plans[0].unlabeled


def test_unlabelled_dataset_never_opens_labels(phantom):
    source = VolumeSlices(phantom, "z")
    norm = {"low": 0.0, "high": 1.0, "mean": 0.5, "std": 0.25}
    ds = UnlabeledSlices(source, ["3", "4"], norm, AugmentSettings(crop_size=40), seed=0)
    weak, strong, valid = ds[(0, 0, 1)]
    assert weak.shape == strong.shape == (1, 40, 40) and valid.shape == (40, 40)
    assert not valid.all() and valid.any()  # 32 px slices padded to 40 unless scaled up
    assert source._labels is None
    again = ds[(0, 0, 1)]
    assert all(torch.equal(a, b) for a, b in zip((weak, strong, valid), again, strict=True))
    # what a spawned DataLoader worker gets: paths, no open arrays, the same samples
    copy = pickle.loads(pickle.dumps(ds))
    assert copy.source._image is None and copy.source._cache == {}
    assert all(torch.equal(a, b) for a, b in zip(again, copy[(0, 0, 1)], strict=True))


def test_labels_from_a_separate_label_store(phantom, tmp_path):
    from magseg_hpc.volume.store import write_image_store

    labels_only = tmp_path / "labels.zarr"
    truth = VolumeSlices(phantom, "y").read_labels("7")
    write_image_store(labels_only, np.zeros((16, 32, 32), np.float32),
                      labels=np.asarray(VolumeSlices(phantom).image_volume().values > 1e9,
                                        dtype=np.uint8))
    source = VolumeSlices(phantom, "y", label_path=labels_only)
    assert source.read_labels("7").shape == truth.shape == (16, 32)
    assert not source.read_labels("7").any() and truth.any()


# --- runs ------------------------------------------------------------------------------------


def test_augseg_run_writes_its_outputs(straight, phantom):
    out, summary = straight
    assert summary["iterations"] == 4 and summary["iterations_per_epoch"] == 5
    assert summary["total_iterations"] == 10
    for name in ("config.yaml", "checkpoint.pt", "best.pt", "metrics.jsonl", "curves.png",
                 "logs/rank0.log", "splits/labeled.txt", "splits/unlabeled.txt",
                 "splits/val.txt"):
        assert (out / name).is_file(), name
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["train"]["max_iters"] == 4 and saved["data"]["volume"] == str(phantom)
    assert read_split(out / "splits/val.txt") == ["14", "15"]
    assert len(read_split(out / "splits/unlabeled.txt")) == 11

    recs = records(out)
    steps = [r for r in recs if "loss" in r]
    evals = [r for r in recs if "teacher_miou" in r]
    assert [r["iteration"] for r in steps] == [1, 2, 3, 4]
    assert all(r["loss"] == pytest.approx(r["loss_sup"] + r["loss_uns"]) for r in steps)
    assert all(0 <= r["pseudo_ratio"] <= 1 and r["lr"] > 0 for r in steps)
    assert steps[0]["lr"] == pytest.approx(0.01)  # poly at t=0
    assert steps[-1]["lr"] == pytest.approx(0.01 * (1 - 3 / 10) ** 0.9)
    assert [r["iteration"] for r in evals] == [2, 4]
    assert set(evals[0]["teacher_iou"]) == {"background", "domain_minus", "domain_plus"}
    assert 0 <= evals[0]["teacher_miou"] <= 1 and 0 <= evals[0]["student_miou"] <= 1

    ckpt = load_checkpoint(out / "checkpoint.pt", expect_model=tiny(phantom)["model"])
    assert ckpt["train_state"]["iteration"] == 4
    assert set(ckpt["normalization"]) == {"low", "high", "mean", "std", "deciles", "support",
                                          "mark_outside"}
    best = load_checkpoint(out / "best.pt")
    assert best["metrics"]["best"]["teacher_miou"] == summary["best_teacher_miou"]
    assert summary["best_teacher_miou"] == max(r["teacher_miou"] for r in evals)
    # epoch 0: the EMA decay is 0, so the teacher is an exact copy of the student
    assert summary["teacher_digest"] == summary["student_digest"]


def board(out: Path):
    """The run's TensorBoard events, as tensorboard --logdir reads them."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tensorboard"), size_guidance={"images": 0})
    events.Reload()
    return events


def test_tensorboard_shows_losses_thresholds_validation_and_panels(straight):
    out, _ = straight
    events = board(out)
    tags = events.Tags()
    classes = ("background", "domain_minus", "domain_plus")
    expected = {f"train/{k}" for k in ("loss", "loss_sup", "loss_uns", "pseudo_ratio", "lr",
                                       "ema_decay", "seconds_per_iter", "images_per_s")}
    expected |= {f"pseudo_threshold/{c}" for c in classes}
    expected |= {"validation/teacher_miou", "validation/student_miou"}
    expected |= {f"validation_iou/{who}/{c}" for who in ("teacher", "student") for c in classes}
    assert expected <= set(tags["scalars"])
    recs = records(out)
    loss = [(e.step, e.value) for e in events.Scalars("train/loss")]
    assert loss == [(r["iteration"], pytest.approx(r["loss"])) for r in recs if "loss" in r]
    teacher = [(e.step, e.value) for e in events.Scalars("validation/teacher_miou")]
    assert teacher == [(r["iteration"], pytest.approx(r["teacher_miou"]))
                       for r in recs if "teacher_miou" in r]
    # 0.95 for the most confident class, lower for the others (class_thresholds)
    thresholds = [events.Scalars(f"pseudo_threshold/{c}")[-1].value for c in classes]
    assert max(thresholds) == pytest.approx(0.95) and min(thresholds) <= 0.95
    # two validation slices, each shown as image | labels | prediction at both evaluations
    assert sorted(tags["images"]) == ["validation_slices/14", "validation_slices/15"]
    shown = events.Images("validation_slices/14")
    assert [im.step for im in shown] == [2, 4]
    # 32-row slices enlarged 8x under their captions, the palette's legend below
    import io

    from PIL import Image

    from magseg_hpc.classes import IGNORE_COLOR, ClassTable, strip_px

    top = strip_px((3 * 8 * 32 + 2 * 8) // 32)  # captions 1/32 of the row's width
    assert shown[0].height == top + 8 * 32 + top
    assert shown[0].width >= 3 * 8 * 32
    picture = np.asarray(Image.open(io.BytesIO(shown[0].encoded_image_string)).convert("RGB"))
    assert (picture[:top] < 100).all(axis=2).any()  # caption text
    colours = {tuple(c) for c in picture.reshape(-1, 3)}
    palette = set(ClassTable.default().display_colors) | {IGNORE_COLOR}
    assert palette <= colours
    labels = picture[top:top + 256, 256 + 8:2 * 256 + 8].reshape(-1, 3)
    assert {tuple(c) for c in labels} <= palette  # drawn in the display palette


def test_resume_ends_bit_identical_to_an_uninterrupted_run(straight, phantom, tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    out_straight, _ = straight
    out = tmp_path / "run"
    first = run_training(config_from_dict(tiny(phantom, max_iters=2)), out)
    assert first["iterations"] == 2
    # a log line from past the checkpoint (a run killed later) must not survive the resume
    with open(out / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"iteration": 3, "loss": 99.0}) + "\n")
    with SummaryWriter(str(out / "tensorboard")) as writer:
        writer.add_scalar("train/loss", 99.0, 3)
    second = run_training(config_from_dict(tiny(phantom, max_iters=4)), out)
    assert second["iterations"] == 4 and second["iterations_this_run"] == 2
    a = torch.load(out_straight / "checkpoint.pt", weights_only=True)
    b = torch.load(out / "checkpoint.pt", weights_only=True)
    for which in ("student", "teacher"):
        assert a[which].keys() == b[which].keys()
        for key in a[which]:
            assert torch.equal(a[which][key], b[which][key]), (which, key)
    mom_a = a["train_state"]["optimizer"]["state"]
    mom_b = b["train_state"]["optimizer"]["state"]
    assert all(torch.equal(mom_a[k]["momentum_buffer"], mom_b[k]["momentum_buffer"])
               for k in mom_a)
    assert [r["iteration"] for r in records(out)] == [
        r["iteration"] for r in records(out_straight)]
    assert [(e.step, e.value) for e in board(out).Scalars("train/loss")] == [
        (r["iteration"], pytest.approx(r["loss"])) for r in records(out) if "loss" in r]
    # already finished: a third call does nothing and changes nothing
    third = run_training(config_from_dict(tiny(phantom, max_iters=4)), out)
    assert third["iterations_this_run"] == 0
    assert third["student_digest"] == second["student_digest"]


def test_augseg_without_a_pseudo_labelled_epoch_says_so(phantom, tmp_path, caplog):
    cfg = tiny(phantom, max_iters=1, epochs=2, sup_only_epochs=2)
    run_training(config_from_dict(cfg), tmp_path / "run")
    assert ("train.epochs 2 <= train.sup_only_epochs 2: no pseudo-labels are ever used"
            in caplog.text)


def test_output_dir_of_another_experiment_is_refused(straight, phantom, tmp_path):
    out, _ = straight
    before = (out / "checkpoint.pt").stat().st_mtime_ns
    with pytest.raises(MagsegError, match=r"another experiment .*train\.lr"):
        run_training(config_from_dict(tiny(phantom, max_iters=4, lr=0.5)), out)
    assert (out / "checkpoint.pt").stat().st_mtime_ns == before
    # without config.yaml the checkpoint's own config decides
    lone = tmp_path / "lone"
    lone.mkdir()
    shutil.copy(out / "checkpoint.pt", lone / "checkpoint.pt")
    with pytest.raises(MagsegError, match=r"another experiment .*seed"):
        run_training(config_from_dict({**tiny(phantom, max_iters=4), "seed": 1}), lone)


def test_supervised_through_the_cli(phantom, tmp_path, capsys):
    config = tmp_path / "sup.yaml"
    config.write_text(yaml.safe_dump(tiny(phantom)))
    out = tmp_path / "run"
    rc = cli_main(["train", "--config", str(config), "--output-dir", str(out),
                   "train.method=supervised", "train.max_iters=2"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert printed.startswith("training stopped at iteration 2 of 10 (2 in this run")
    assert f"all numbers: {out}/summary.json" in printed
    summary = json.loads((out / "summary.json").read_text())
    assert summary["iterations"] == 2 and summary["best_iteration"] == 2
    assert f"best {summary['best_teacher_miou']:.4f} at iteration 2" in printed
    steps = [r for r in records(out) if "loss" in r]
    assert all(r["loss_uns"] == 0 and r["pseudo_ratio"] == 0 for r in steps)
    assert yaml.safe_load((out / "config.yaml").read_text())["train"]["method"] == "supervised"
    rc = cli_main(["train", "--config", str(config), "--output-dir", str(out),
                   "train.max_iter=3"])
    assert rc == 2
    assert "unknown config key 'train.max_iter'" in capsys.readouterr().err


def test_folder_layout_of_the_study(tmp_path):
    from PIL import Image

    root = tmp_path / "magdom"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    phantom = make_phantom((12, 32, 32), seed=3, n_angles=0)
    colors = np.array([(149, 0, 255), (30, 0, 255), (255, 0, 0)], dtype=np.uint8)
    ids = [f"slice_{i:03d}" for i in range(12)]
    for i, name in enumerate(ids):
        grey = np.clip(phantom.image[i] * 120 + 60, 0, 255).astype(np.uint8)
        Image.fromarray(np.stack([grey] * 3, axis=-1)).save(root / "images" / f"{name}.png")
        mask = colors[phantom.labels[i]]
        mask[:2, :2] = (0, 255, 0)  # a colour not in the class table
        Image.fromarray(mask).save(root / "masks" / f"{name}.png")
    (root / "labeled.txt").write_text("\n".join(f"images/{n}.png masks/{n}.png" for n in ids[:3]))
    (root / "unlabeled.txt").write_text("\n".join(ids[3:10]))
    (root / "val.txt").write_text("\n".join(ids[10:]))

    source = FolderSlices(root, config_from_dict({}).class_table)
    labels = source.read_labels(ids[0])
    assert (labels[:2, :2] == 255).all()
    assert np.array_equal(labels[2:, 2:], phantom.labels[0][2:, 2:])

    raw = tiny(None, max_iters=2)
    raw["data"] = {"folder": str(root)}
    out = tmp_path / "run"
    summary = run_training(config_from_dict(raw), out)
    assert summary["iterations"] == 2
    assert read_split(out / "splits/labeled.txt") == ids[:3]
    assert read_split(out / "splits/val.txt") == ids[10:]
    assert summary["last_eval"]["teacher_miou"] >= 0


def test_training_on_a_phantom_beats_chance(tmp_path):
    """Supervised, 24 iterations, scored on a separate phantom volume: well above predicting
    the majority class (about 0.2)."""
    train, held_out = tmp_path / "train.zarr", tmp_path / "val.zarr"
    write_phantom(train, make_phantom((16, 40, 40), seed=2, n_angles=30))
    write_phantom(held_out, make_phantom((4, 40, 40), seed=3, n_angles=30))
    raw = tiny(train, method="supervised", batch_size=4, crop_size=40, epochs=30,
               max_iters=24, eval_every=24, checkpoint_every=24, log_every=8,
               scale_range=[0.75, 1.25])
    raw["data"].update(n_labeled=6, n_val=0, val_volume=str(held_out))
    raw["model"] = {**TINY_MODEL, "width": 64}  # at width 16, 24 steps stay near 0.4
    summary = run_training(config_from_dict(raw), tmp_path / "run")
    assert read_split(tmp_path / "run/splits/val.txt") == ["0", "1", "2", "3"]
    assert len(read_split(tmp_path / "run/splits/unlabeled.txt")) == 10
    last = summary["last_eval"]
    assert max(last["teacher_miou"], last["student_miou"]) > 0.45, last


def test_random_kills_of_training_resume_to_the_uninterrupted_weights(phantom, tmp_path,
                                                                      tmp_path_factory,
                                                                      command_server):
    """6 SIGKILLs at random moments of `magseg-hpc train`: each leaves a checkpoint that
    loads (written atomically) and the run resumable; the last rerun ends with the weights of
    an uninterrupted run, bit for bit. (Each run a forked process of the command server:
    every moment falls in the training's own work, none in Python's start-up, where about a
    third of the 20 kills of a fresh interpreter each landed.)"""
    import random
    import time

    # a checkpoint (~0.9 s to write here) every 5 iterations: kills land between them too
    raw = tiny(phantom, epochs=3, checkpoint_every=5, eval_every=5)
    config = tmp_path / "cfg.yaml"
    config.write_text(yaml.safe_dump(raw))
    out = tmp_path / "killed"
    log = tmp_path_factory.mktemp("logs") / "train.log"

    def train(folder: Path = out) -> int:
        return command_server.start(["train", "--config", config, "--output-dir", folder], log)

    started = time.monotonic()  # how long a whole run takes, uninterrupted
    assert command_server.wait(train(tmp_path / "straight")) == 0, log.read_text()
    one_run = time.monotonic() - started
    straight = json.loads((tmp_path / "straight" / "summary.json").read_text())
    moments = random.Random(0)
    reached = []
    for _ in range(6):
        pid = train()
        time.sleep(moments.uniform(0.0, one_run))
        command_server.kill(pid)
        if (out / "checkpoint.pt").exists():  # never a half-written file
            reached.append(load_checkpoint(out / "checkpoint.pt")["train_state"]["iteration"])
        if (out / "summary.json").exists():  # the kill came after the end: start afresh
            shutil.rmtree(out)
    if not any(0 < it < 15 for it in reached):  # the moments all missed the training's middle
        shutil.rmtree(out, ignore_errors=True)  # (a slower run than the straight one): one more,
        pid, deadline = train(), time.monotonic() + 120  # killed as its first checkpoint lands
        while not (out / "checkpoint.pt").exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        command_server.kill(pid)
        reached.append(load_checkpoint(out / "checkpoint.pt")["train_state"]["iteration"])
    assert any(0 < it < 15 for it in reached), reached  # some kills landed mid-training
    assert command_server.wait(train()) == 0, log.read_text()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["iterations"] == straight["iterations"] == 15
    assert summary["student_digest"] == straight["student_digest"]
    assert summary["teacher_digest"] == straight["teacher_digest"]
