"""Checkpoint format: round trip, atomic write, refusals with MagsegError."""

import os

import pytest
import torch

from magseg_hpc.classes import ClassTable
from magseg_hpc.errors import MagsegError
from magseg_hpc.models import build_model
from magseg_hpc.models.checkpoint import (
    FORMAT,
    checkpoint_model,
    checkpoint_sha256,
    load_checkpoint,
    load_inference_model,
    save_checkpoint,
)

# small (a few MB a checkpoint); the decoder at its default width, so an entry written before
# decoder_channels existed is this model
MODEL_CFG = {"backbone": "resnet10", "width": 16, "num_classes": 3}


@pytest.fixture(scope="module")
def ckpt():
    torch.manual_seed(0)
    student = build_model(MODEL_CFG)
    teacher = build_model(MODEL_CFG)
    return {
        "model": student.config,
        "class_table": ClassTable.default().to_dict(),
        "normalization": {"low": 1.5, "high": 250.0, "mean": 0.4, "std": 0.2},
        "student": student.state_dict(),
        "teacher": teacher.state_dict(),
        "train_state": {
            "iteration": 7,
            "torch_rng": torch.get_rng_state(),
            "python_rng": [3, [1, 2, 3], None],
        },
        "config": {"seed": 1, "train": {"max_iters": 10}},
        "metrics": {"best_miou": 0.5},
    }


def test_round_trip(tmp_path, ckpt):
    path = tmp_path / "run" / "checkpoint.pt"
    save_checkpoint(path, ckpt)
    got = load_checkpoint(path, expect_class_table=ClassTable.default(), expect_model=MODEL_CFG)
    assert got["format"] == FORMAT
    assert got["train_state"]["iteration"] == 7
    assert torch.equal(got["train_state"]["torch_rng"], ckpt["train_state"]["torch_rng"])
    for k, v in ckpt["teacher"].items():
        assert torch.equal(got["teacher"][k], v)
    assert got["normalization"] == ckpt["normalization"]
    assert len(checkpoint_sha256(path)) == 64
    model, _ = load_inference_model(path, which="teacher")
    assert not model.training
    for k, v in model.state_dict().items():
        assert torch.equal(v, ckpt["teacher"][k])
    x = torch.randn(1, 1, 40, 40)
    assert model(x).shape == (1, 3, 40, 40)


def test_atomic_write_leaves_no_tmp_and_replaces(tmp_path, ckpt):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, ckpt)
    first = checkpoint_sha256(path)
    save_checkpoint(path, {**ckpt, "metrics": {"best_miou": 0.9}})
    assert os.listdir(tmp_path) == ["checkpoint.pt"]
    assert checkpoint_sha256(path) != first
    assert load_checkpoint(path)["metrics"]["best_miou"] == 0.9


def test_unsaveable_value_refused_before_writing(tmp_path, ckpt):
    import numpy as np

    with pytest.raises(TypeError, match="numpy"):
        save_checkpoint(tmp_path / "c.pt", {**ckpt, "train_state": {"rng": np.zeros(3)}})
    assert os.listdir(tmp_path) == []


def test_missing_file(tmp_path):
    with pytest.raises(MagsegError, match="not found"):
        load_checkpoint(tmp_path / "nope.pt")


class Payload:
    """Stands in for an arbitrary pickled object (the reason weights_only exists)."""

    def __reduce__(self):
        return (print, ("unpickling ran code",))


def test_pickle_with_arbitrary_objects_refused(tmp_path, capsys):
    path = tmp_path / "evil.pt"
    torch.save({"format": FORMAT, "obj": Payload()}, path)
    with pytest.raises(MagsegError, match="refusing"):
        load_checkpoint(path)
    assert "unpickling ran code" not in capsys.readouterr().out


def test_foreign_torch_file(tmp_path):
    torch.save({"state_dict": {"w": torch.zeros(2)}}, tmp_path / "f.pt")
    with pytest.raises(MagsegError, match="not a magseg-hpc checkpoint"):
        load_checkpoint(tmp_path / "f.pt")
    torch.save({"format": "other/9"}, tmp_path / "g.pt")
    with pytest.raises(MagsegError, match="format"):
        load_checkpoint(tmp_path / "g.pt")


def test_corrupt_file(tmp_path, ckpt):
    path = tmp_path / "c.pt"
    save_checkpoint(path, ckpt)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(MagsegError, match="cannot read"):
        load_checkpoint(path)
    (tmp_path / "t.pt").write_text("hello")
    with pytest.raises(MagsegError, match="cannot read"):
        load_checkpoint(tmp_path / "t.pt")


def test_class_table_and_architecture_mismatch(tmp_path, ckpt):
    path = tmp_path / "c.pt"
    save_checkpoint(path, ckpt)
    other = ClassTable(names=("a", "b"), colors=((0, 0, 0), (1, 1, 1)))
    with pytest.raises(MagsegError, match="trained for classes"):
        load_checkpoint(path, expect_class_table=other)
    with pytest.raises(MagsegError, match="backbone"):
        load_checkpoint(path, expect_model={"backbone": "resnet50", "num_classes": 3})
    with pytest.raises(MagsegError, match="num_classes"):
        load_checkpoint(path, expect_model={**MODEL_CFG, "num_classes": 4})


def test_older_model_entries_still_load(tmp_path, ckpt):
    """A checkpoint's model entry missing keys (written before they existed: their defaults)
    or holding norm auto (decided, as training decides it, from its normalisation)."""
    old = {k: v for k, v in ckpt["model"].items()
           if k not in ("norm", "context_slices", "decoder_channels")}
    save_checkpoint(tmp_path / "old.pt", {**ckpt, "model": old})
    model, _ = load_inference_model(tmp_path / "old.pt")
    assert model.config == ckpt["model"]
    load_checkpoint(tmp_path / "old.pt", expect_model=MODEL_CFG)
    masked = {**ckpt["normalization"], "support": {"outside": "value", "value": 0.0}}
    for normalization, norm in ((ckpt["normalization"], "batch"), (masked, "group")):
        path = tmp_path / f"auto_{norm}.pt"
        save_checkpoint(path, {**ckpt, "model": {**ckpt["model"], "norm": "auto"},
                               "normalization": normalization})
        assert checkpoint_model(torch.load(path, weights_only=True)).norm == norm
    load_checkpoint(tmp_path / "auto_batch.pt", expect_model=MODEL_CFG)


def test_a_full_disk_is_said_as_such(tmp_path, ckpt):
    """torch reports a full disk as a RuntimeError; the checkpoint writer says ENOSPC (one
    line at the CLI: "No space left on device"), and leaves no partial file. A real full
    disk: a 1 MiB tmpfs (mounting needs root, as CI runs)."""
    import errno
    import subprocess

    if os.geteuid() != 0 and not os.environ.get("CI"):
        pytest.skip("mounting a small tmpfs needs root (CI runs as root)")
    tiny = tmp_path / "tiny"
    tiny.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(tiny)], check=True)
    try:
        big = dict(ckpt, student={"w": torch.zeros(2**20)})  # 4 MiB of weights
        with pytest.raises(OSError) as err:
            save_checkpoint(tiny / "checkpoint.pt", big)
        assert err.value.errno == errno.ENOSPC
        assert list(tiny.iterdir()) == []
    finally:
        subprocess.run(["umount", str(tiny)], check=True)
