"""The checkpoint file: one ``torch.save`` of a dict of plain data, loaded with weights_only.

Keys (format "magseg-hpc/checkpoint/1"):

| key | content |
|---|---|
| format | "magseg-hpc/checkpoint/1" |
| model | resolved ``ModelConfig`` as a dict (``model.config``; ``checkpoint_model`` reads it) |
| class_table | ``ClassTable.to_dict()`` |
| normalization | low, high, mean, std, deciles, support (``magseg_hpc.data.normalize``) |
| student, teacher | state_dicts (the teacher is what inference uses) |
| train_state | dict for resume (optimizer, iteration, RNG states as tensors), may be empty |
| config | resolved experiment config dict |
| metrics | dict (best teacher mIoU etc.) |

Only tensors, dicts, lists, tuples, str, int, float, bool and None are allowed, so that
``torch.load(weights_only=True)`` can read the file without unpickling arbitrary objects;
``save_checkpoint`` checks this before writing (numpy arrays are the usual offender:
convert them with ``torch.from_numpy``).
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import logging
import os
import shutil
from collections import OrderedDict
from pathlib import Path

import torch
from torch import nn

from magseg_hpc.classes import ClassTable
from magseg_hpc.errors import MagsegError
from magseg_hpc.models import ARCHITECTURE_KEYS, ModelConfig, build_model
from magseg_hpc.models.weights import read_weights
from magseg_hpc.paths import atomic_write
from magseg_hpc.volume.support import is_masked, support_of

log = logging.getLogger(__name__)

FORMAT = "magseg-hpc/checkpoint/1"
REQUIRED_KEYS = ("model", "class_table", "normalization", "student", "teacher")
OPTIONAL_KEYS = ("train_state", "config", "metrics")
_PLAIN = (str, int, float, bool, type(None), torch.Tensor, torch.Size, torch.dtype)


def _check_plain(obj, where: str) -> None:
    if isinstance(obj, _PLAIN):
        return
    if isinstance(obj, dict | OrderedDict):
        for k, v in obj.items():
            if not isinstance(k, str | int):
                raise TypeError(f"checkpoint key {where}[{k!r}] is a {type(k).__name__}")
            _check_plain(v, f"{where}[{k!r}]")
        return
    if isinstance(obj, list | tuple):
        for i, v in enumerate(obj):
            _check_plain(v, f"{where}[{i}]")
        return
    raise TypeError(
        f"checkpoint value {where} is a {type(obj).__module__}.{type(obj).__name__}; only "
        "tensors, dicts, lists, str, int, float, bool and None load with weights_only=True "
        "(convert numpy arrays with torch.from_numpy)"
    )


def _tensor_bytes(value) -> int:
    """The bytes of the tensors in a nested checkpoint dict: about its size on disk."""
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        return sum(_tensor_bytes(v) for v in value.values())
    if isinstance(value, list | tuple):
        return sum(_tensor_bytes(v) for v in value)
    return 0


def save_checkpoint(path: str | Path, ckpt: dict) -> None:
    """Write ``ckpt`` to ``path`` atomically (``atomic_write``, with fsync), so a crash
    leaves either the old file or the new one, never half.

    Sets "format" and fills missing optional keys with {}. Raises TypeError (a programming
    error) if a value would not load with weights_only, KeyError if a required key is missing.
    """
    path = Path(path)
    missing = [k for k in REQUIRED_KEYS if k not in ckpt]
    if missing:
        raise KeyError(f"checkpoint lacks required key(s) {missing}; required: {REQUIRED_KEYS}")
    ckpt = {"format": FORMAT, **ckpt, **{k: ckpt.get(k) or {} for k in OPTIONAL_KEYS}}
    ckpt["format"] = FORMAT
    _check_plain(ckpt, "ckpt")
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        atomic_write(path, lambda f: torch.save(ckpt, f), fsync=True)
    except RuntimeError as e:
        # torch's zip writer reports a full disk as a RuntimeError ("unexpected pos ...")
        if shutil.disk_usage(path.parent).free < _tensor_bytes(ckpt) + (1 << 20):
            raise OSError(errno.ENOSPC, "No space left on device", str(path)) from e
        raise
    try:  # make the rename itself durable
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass


def load_checkpoint(
    path: str | Path,
    *,
    expect_class_table: ClassTable | dict | None = None,
    expect_model: ModelConfig | dict | None = None,
) -> dict:
    """Read a checkpoint with ``weights_only=True`` onto the CPU and check it.

    Raises MagsegError for a missing, unreadable or foreign file, and when the class table
    (names, in order) or the architecture keys of the model config differ from the expected.
    """
    path = Path(path)
    ckpt = read_weights(
        path,
        missing=f"checkpoint not found: {path}; give the path of a checkpoint.pt or best.pt "
        "written by `magseg-hpc train`",
        unreadable=f"cannot read checkpoint {path}",
        fix="the file is truncated or not a torch file; use another checkpoint (e.g. best.pt "
        "or checkpoint.pt) or retrain",
    )
    fmt = ckpt.get("format") if isinstance(ckpt, dict) else None
    if fmt is None:
        raise MagsegError(
            f"{path} is a torch file but not a magseg-hpc checkpoint (no 'format' key); give "
            "a checkpoint written by `magseg-hpc train` (ImageNet weights go to model.pretrained)"
        )
    if fmt != FORMAT:
        raise MagsegError(
            f"{path} has checkpoint format {fmt!r}, this magseg-hpc reads {FORMAT!r}; use the "
            "magseg-hpc version that wrote it or retrain"
        )
    missing = [k for k in REQUIRED_KEYS if k not in ckpt]
    if missing:
        raise MagsegError(
            f"checkpoint {path} lacks {missing}; it is damaged, retrain or use another"
        )

    if expect_class_table is not None:
        expected = (
            expect_class_table
            if isinstance(expect_class_table, ClassTable)
            else ClassTable.from_dict(expect_class_table)
        )
        got = ClassTable.from_dict(ckpt["class_table"])
        if got.names != expected.names:
            raise MagsegError(
                f"checkpoint {path} was trained for classes {list(got.names)}, expected "
                f"{list(expected.names)}; use a checkpoint for these classes or the class "
                "table the checkpoint was trained with"
            )
        if got.colors != expected.colors:
            log.warning("checkpoint %s has other class colours than expected; names agree", path)
    if expect_model is not None:
        check_architecture(path, ckpt, expect_model)
    return ckpt


def checkpoint_model(ckpt: dict) -> ModelConfig:
    """The checkpoint's resolved model config. Older checkpoints may lack keys (their
    defaults apply) or hold ``norm: auto``, decided here as training decides it: from the
    support their normalisation carries."""
    masked = is_masked(support_of(ckpt.get("normalization")))
    return ModelConfig.from_dict(ckpt["model"]).resolved(masked=masked)


def check_architecture(path: str | Path, ckpt: dict, expect_model: ModelConfig | dict) -> None:
    """Refuse a checkpoint whose model differs from ``expect_model`` (resolved) in an
    architecture key."""
    want = (expect_model if isinstance(expect_model, ModelConfig)
            else ModelConfig.from_dict(expect_model)).resolved()
    have = checkpoint_model(ckpt)
    diff = [k for k in ARCHITECTURE_KEYS if getattr(want, k) != getattr(have, k)]
    if diff:
        pairs = ", ".join(f"{k}: {getattr(have, k)!r} (expected {getattr(want, k)!r})"
                          for k in diff)
        raise MagsegError(
            f"checkpoint {path} is for another architecture ({pairs}); set model.* to "
            "match the checkpoint or start from a matching checkpoint"
        )


def checkpoint_sha256(path: str | Path) -> str:
    """Hex SHA-256 of the file, recorded in outputs as provenance."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def nonfinite_tensors(state: dict) -> list[str]:
    """Names of floating-point tensors in a state dict holding NaN or inf."""
    return [k for k, v in state.items()
            if isinstance(v, torch.Tensor) and v.is_floating_point()
            and not bool(torch.isfinite(v).all())]


def check_finite_checkpoint(ckpt: dict, path: str | Path, which: str = "teacher") -> None:
    """Refuse weights or normalisation statistics with NaN/inf: they segment nothing."""
    import math

    bad = nonfinite_tensors(ckpt.get(which) or {})
    if bad:
        raise MagsegError(
            f"checkpoint {path}: {which} weights hold NaN/inf ({len(bad)} tensors, e.g. "
            f"{bad[0]}); the training diverged, retrain (e.g. with a lower train.lr)"
        )
    norm = ckpt.get("normalization") or {}
    values = {k: norm.get(k) for k in ("low", "high", "mean", "std")}
    wrong = [k for k, v in values.items()
             if not isinstance(v, (int, float)) or not math.isfinite(v)]
    if not wrong and not (values["high"] > values["low"] and values["std"] > 0):
        wrong = ["high > low and std > 0"]
    if wrong:
        raise MagsegError(
            f"checkpoint {path}: intensity normalisation is not usable ({', '.join(wrong)}: "
            f"{norm}); retrain or use another checkpoint"
        )


def load_inference_model(
    path: str | Path, device: str | torch.device = "cpu", which: str = "teacher"
) -> tuple[nn.Module, dict]:
    """Build the checkpoint's model, load its ``which`` weights ("teacher" or "student"),
    move it to ``device`` and put it in eval mode. Returns (model, ckpt)."""
    if which not in ("teacher", "student"):
        raise MagsegError(f"which={which!r}: choose 'teacher' or 'student'")
    ckpt = load_checkpoint(path)
    state = ckpt.get(which)
    if not state:
        raise MagsegError(f"checkpoint {path} has no {which} weights; use which='student'")
    check_finite_checkpoint(ckpt, path, which)
    # Pretrained ImageNet weights are irrelevant here (overwritten) and may not exist locally.
    model = build_model(dataclasses.replace(checkpoint_model(ckpt), pretrained=None))
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise MagsegError(
            f"the {which} weights in {path} do not fit its model config "
            f"({str(e).splitlines()[0][:160]}); the checkpoint is damaged, retrain"
        ) from e
    model = model.to(device).eval()
    if torch.device(device).type == "cpu" and not model.config["name"].startswith("sam"):
        # oneDNN's convolutions run ~25 % faster on channels-last weights and inputs, fp32 and
        # bf16 alike (benchmarks/results/precision.md); the kernel passes its input that way.
        # Not for SAM: a ViT (measured on DeepLabV3+ only)
        model = model.to(memory_format=torch.channels_last)
    return model, ckpt


def fuses(check: dict) -> bool:
    """A checkpoint's ``fusion_check`` (train/fusion_check.py) says fuse the planes: only when
    fusion scored strictly better than the labelled axis alone (a tie keeps the single axis:
    a third of the work)."""
    return check["fused_miou"] > check["axis_miou"]
