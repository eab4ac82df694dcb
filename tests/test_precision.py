"""Precision of the forwards (magseg_hpc.precision): auto takes bf16 only where the hardware
computes it natively, every inference path and the training steps honour the choice, and a
segment-volume run records it so a resume never mixes precisions."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch
from segment_utils import NORM, make_checkpoint, make_volume, write_input

from magseg_hpc import precision
from magseg_hpc.cli import build_parser
from magseg_hpc.config import config_from_dict, config_to_dict, experiment_differences
from magseg_hpc.errors import MagsegError
from magseg_hpc.models.checkpoint import load_inference_model
from magseg_hpc.segment.kernel import segment_slab
from magseg_hpc.segment.pipeline import SegmentOptions, prepare
from magseg_hpc.train.distributed import DistEnv
from magseg_hpc.train.steps import autocast as train_autocast


@pytest.mark.parametrize(("flags", "native"), [
    ("fpu sse avx512f avx512bw", False),
    ("fpu avx512f avx512_bf16 avx512_vnni", True),
    ("fpu amx_tile amx_bf16 amx_int8", True),
])
def test_cpu_bf16_is_read_from_the_cpu_flags(tmp_path, flags, native):
    info = tmp_path / "cpuinfo"
    info.write_text(f"processor\t: 0\nflags\t\t: {flags}\n\nprocessor\t: 1\nflags\t\t: {flags}\n")
    assert precision.cpu_has_bf16(str(info)) is native
    assert precision.cpu_has_bf16(str(tmp_path / "missing")) is False


@pytest.mark.parametrize("native", [True, False])
def test_auto_takes_bf16_on_a_cpu_only_where_it_is_native(monkeypatch, native):
    monkeypatch.setattr(precision, "cpu_has_bf16", lambda: native)
    assert precision.resolve_precision("auto", "cpu") == ("bf16" if native else "fp32")
    # an explicit choice is kept; emulated bf16 is allowed but said to be slow
    assert precision.resolve_precision("fp32", "cpu") == "fp32"
    assert precision.resolve_precision("bf16", "cpu") == "bf16"
    assert ("emulated" in precision.describe("bf16", "cpu")) is not native
    with pytest.raises(MagsegError, match="expected one of auto, fp32, bf16"):
        precision.resolve_precision("fp16", "cpu")


def test_autocast_context_per_choice():
    assert isinstance(precision.autocast("cpu", "fp32"), contextlib.nullcontext)
    with precision.autocast("cpu", "bf16"):
        out = torch.nn.functional.conv2d(torch.randn(1, 2, 8, 8), torch.randn(3, 2, 3, 3))
    assert out.dtype == torch.bfloat16
    env = DistEnv(0, 1, 0, torch.device("cpu"), None)
    fp32 = config_from_dict({"train": {"precision": "fp32"}})
    bf16 = config_from_dict({"train": {"precision": "bf16"}})
    assert isinstance(train_autocast(env, fp32), contextlib.nullcontext)
    assert isinstance(train_autocast(env, bf16), torch.autocast)


def test_segment_slab_in_bf16_agrees_with_fp32(tmp_path):
    """bf16 really runs (probabilities differ from fp32's) and agrees on the labels."""
    model, _ = load_inference_model(make_checkpoint(tmp_path / "m.pt"))
    vol = make_volume((6, 48, 40))
    labels32, probs32 = segment_slab(model, vol, NORM, num_classes=3, batch_size=3,
                                     with_probabilities=True)
    labels16, probs16 = segment_slab(model, vol, NORM, num_classes=3, batch_size=3,
                                     with_probabilities=True, precision="bf16")
    assert not np.array_equal(probs32, probs16)
    assert np.abs(probs32.astype(int) - probs16.astype(int)).mean() < 2.0  # of 255
    assert (labels32 == labels16).mean() > 0.97


def test_segment_volume_records_the_precision_it_was_started_with(tmp_path):
    ckpt = make_checkpoint(tmp_path / "m.pt")
    inp = write_input(tmp_path / "in.zarr", make_volume((3, 20, 24)), (2, 20, 24))

    def fields(choice):
        return prepare(SegmentOptions(str(inp), str(tmp_path / f"{choice}.zarr"),
                                      model=str(ckpt), precision=choice))

    fp32, auto, bf16 = fields("fp32"), fields("auto"), fields("bf16")
    # fp32 adds nothing, so runs started before the option existed still resume
    assert "precision" not in fp32.fields and fp32.job.precision == "fp32"
    assert auto.fields["precision"] == "auto" and auto.job.precision == "auto"
    assert bf16.fields["precision"] == "bf16"
    thresh = prepare(SegmentOptions(str(inp), str(tmp_path / "t.zarr"), method="threshold"))
    assert thresh.job.precision == "fp32" and "precision" not in thresh.fields
    with pytest.raises(MagsegError, match="--precision 'fp16'"):
        fields("fp16")


def test_precision_flags():
    parse = build_parser().parse_args
    assert parse(["segment-volume", "a.zarr", "b.zarr"]).precision == "auto"
    assert parse(["segment-volume", "a.zarr", "b.zarr", "--bf16"]).precision == "bf16"
    assert parse(["segment-volume", "a.zarr", "b.zarr", "--precision", "fp32"]).precision == "fp32"
    assert parse(["suggest-slices", "v.zarr", "--model", "m.pt", "--n", "2",
                  "--precision", "fp32"]).precision == "fp32"


def test_train_precision_key():
    assert config_from_dict({}).train.precision == "auto"
    with pytest.raises(MagsegError, match="train.precision"):
        config_from_dict({"train": {"precision": "half"}})
    with pytest.raises(MagsegError, match="unknown config key 'train.amp'"):
        config_from_dict({"train": {"amp": True}})
    # like the device, the precision may change when a run is resumed elsewhere
    assert experiment_differences(
        config_to_dict(config_from_dict({"train": {"precision": "fp32"}})),
        config_to_dict(config_from_dict({}))) == []


def test_class_argmax_is_argmax_with_ties_to_the_lower_class():
    from magseg_hpc.segment.kernel import class_argmax

    gen = torch.Generator().manual_seed(0)
    probs = torch.randint(0, 4, (3, 4, 9, 7), generator=gen).float()  # many ties
    assert torch.equal(class_argmax(probs).long(), probs.argmax(dim=1))
    cl = probs.contiguous(memory_format=torch.channels_last)
    assert torch.equal(class_argmax(cl).long(), probs.argmax(dim=1))
