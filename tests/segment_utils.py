"""Helpers for the segment-volume tests: a tiny checkpoint, input stores, in-memory oracles."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from magseg_hpc.classes import ClassTable

MODEL_CFG = {"name": "deeplabv3plus", "backbone": "resnet10", "width": 16,
             "decoder_channels": 32, "num_classes": 3, "in_channels": 1, "pretrained": None}
NORM = {"low": -2.0, "high": 2.0, "mean": 0.5, "std": 0.25}


def make_checkpoint(path: Path, seed: int = 0, class_table: ClassTable | None = None) -> Path:
    """A tiny DeepLabV3+/ResNet-10 checkpoint with seeded random weights (teacher = student).

    BatchNorm running statistics are perturbed so the untrained net gives varied classes.
    """
    from magseg_hpc.models import build_model
    from magseg_hpc.models.checkpoint import save_checkpoint

    torch.manual_seed(seed)
    model = build_model(MODEL_CFG)
    state = model.state_dict()
    gen = torch.Generator().manual_seed(seed)
    for k, v in state.items():
        if k.endswith("running_mean"):
            state[k] = torch.randn(v.shape, generator=gen) * 0.1
    save_checkpoint(path, {
        "model": MODEL_CFG, "class_table": (class_table or ClassTable.default()).to_dict(),
        "normalization": NORM, "student": state, "teacher": state,
    })
    return path


def make_volume(shape=(13, 37, 29), seed: int = 1) -> np.ndarray:
    """Smooth-ish random structure (so predictions vary in space) plus noise, float32."""
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    field = ndimage.gaussian_filter(rng.normal(size=shape), 2.0)
    field /= field.std()
    return (field + 0.3 * rng.normal(size=shape)).astype(np.float32)


def write_input(path: Path, volume: np.ndarray, chunks) -> Path:
    from magseg_hpc.volume.store import write_image_store

    write_image_store(path, volume, chunks=chunks)
    return path


def default_precision():
    """segment-volume's default precision on this CPU as a context (bf16 where native)."""
    from magseg_hpc.precision import autocast, resolve_precision

    return autocast("cpu", resolve_precision("auto", "cpu"))


def reference_probabilities(ckpt: Path, volume: np.ndarray, axis: str = "z",
                            tta: bool = False) -> np.ndarray:
    """Class probabilities (C, z, y, x): the model applied slice by slice with plain torch,
    in segment-volume's default precision on this machine (bf16 where native, see
    magseg_hpc.precision)."""
    from magseg_hpc.data.normalize import apply_normalization
    from magseg_hpc.models.checkpoint import load_inference_model

    model, meta = load_inference_model(ckpt)
    ax = "zyx".index(axis)
    out = np.zeros((3, *volume.shape), np.float32)
    flips = [()] + ([(3,), (2,), (2, 3)] if tta else [])
    with torch.no_grad(), default_precision():
        for i in range(volume.shape[ax]):
            img = apply_normalization(np.take(volume, i, axis=ax), meta["normalization"])
            x = torch.from_numpy(np.asarray(img, np.float32))[None, None]
            p = 0
            for dims in flips:
                xi = torch.flip(x, dims) if dims else x
                pi = torch.softmax(model(xi).float(), dim=1)
                p = p + (torch.flip(pi, dims) if dims else pi)
            p = (p / len(flips))[0].numpy()
            idx = [slice(None)] * 4
            idx[1 + ax] = i
            out[tuple(idx)] = p
    return out


def quantize(p: np.ndarray) -> np.ndarray:
    return np.rint(np.clip(p, 0, 1) * 255).astype(np.uint8)


def reference_fusion(ckpt: Path, volume: np.ndarray, axes=("z", "y", "x"), tta=False):
    """Orthoplane oracle: per-axis uint8-quantised probabilities, mean, argmax."""
    total = sum(quantize(reference_probabilities(ckpt, volume, a, tta)).astype(np.uint16)
                for a in axes)
    return total.argmax(axis=0).astype(np.uint8), np.rint(total / len(axes)).astype(np.uint8)


def read_labels(out: Path) -> np.ndarray:
    import zarr

    return np.asarray(zarr.open_group(str(out), mode="r")["labels"][:])


def is_complete(out: Path) -> bool:
    import zarr

    return bool(zarr.open_group(str(out), mode="r").attrs.get("magseg_hpc", {}).get("complete"))
