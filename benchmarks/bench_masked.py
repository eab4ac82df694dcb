"""Masked reconstructions: what skipping background-only planes saves, and why planes are not
cropped to a window around the sample.

On a masked volume (everything outside the sample exactly one value) ``segment_slab`` skips
the model on planes that hold no sample pixel (``kernel.planes_with_sample``). This runs the
same planes through the same trained model, one torch thread, in three ways:

- ``every plane``: the model on every whole plane (what happened before the skip);
- ``skip empty`` (segment-volume): whole planes, background-only ones skipped;
- ``window 32``: each batch cropped to its non-masked pixels' bounding box plus 32 px (the
  rejected alternative; the decoder's image pooling then sees less background);

and reports seconds, mIoU against the truth (the input's ``labels``) and how many labels
differ from ``every plane``. z: ``--planes`` consecutive planes through the middle; y: every
y plane (most of a tilted pillar's y planes beside it hold none of it).

    magseg-hpc make-phantom s0.zarr --preset sweep --shape 213,600,600 --seed 0
    magseg-hpc make-phantom s1.zarr --preset sweep --shape 213,600,600 --seed 1
    magseg-hpc train --config configs/cpu_best.yaml --output-dir best data.volume=s0.zarr
    .venv/bin/python benchmarks/bench_masked.py --volume s1.zarr --model best/best.pt

Writes ``benchmarks/results/masked.md`` (and ``masked.json``).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
import zarr

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _results import write_results  # noqa: E402

from magseg_hpc.data.normalize import fit_normalization  # noqa: E402
from magseg_hpc.metrics import confusion_matrix, scores_from_confusion  # noqa: E402
from magseg_hpc.models.checkpoint import load_inference_model  # noqa: E402
from magseg_hpc.segment import kernel  # noqa: E402
from magseg_hpc.volume.support import inside_pixels, is_masked, support_of  # noqa: E402

MARGIN, ALIGN = 32, 32


def window(inside: np.ndarray) -> tuple[slice, slice]:
    """The bounding box of ``inside`` (H, W) plus MARGIN, sides rounded up to ALIGN."""
    out = []
    for other, size in ((1, inside.shape[0]), (0, inside.shape[1])):
        hits = np.flatnonzero(inside.any(axis=other))
        lo, hi = int(hits[0]) - MARGIN, int(hits[-1]) + 1 + MARGIN
        extent = min(size, -(-(hi - lo) // ALIGN) * ALIGN)
        lo = min(max(0, lo - (extent - (hi - lo)) // 2), size - extent)
        out.append(slice(lo, lo + extent))
    return out[0], out[1]


def segment(model, planes, norm, context, mode) -> np.ndarray:
    kw = {"num_classes": 3, "batch_size": 8, "context": context}
    if mode == "skip empty":
        return kernel.segment_slab(model, planes, norm, **kw)[0]
    if mode == "every plane":
        original = kernel.planes_with_sample
        kernel.planes_with_sample = lambda raw, support: np.ones(len(raw), bool)
        try:
            return kernel.segment_slab(model, planes, norm, **kw)[0]
        finally:
            kernel.planes_with_sample = original
    labels = np.zeros(planes.shape, np.uint8)  # window: batch by batch, as segment_slab
    support = support_of(norm)
    half = context // 2
    for start in range(0, len(planes), 8):
        lo, hi = max(0, start - half), min(len(planes), start + 8 + half)
        inside = inside_pixels(planes[lo:hi], support).any(axis=0)
        if not inside.any():
            continue
        rows, cols = window(inside)
        part = kernel.segment_slab(model, planes[lo:hi, rows, cols], norm, before=start - lo,
                                   count=min(8, len(planes) - start), **kw)[0]
        labels[start:start + len(part), rows, cols] = part
    return labels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--volume", required=True, help="masked zarr with image and labels")
    parser.add_argument("--model", required=True, help="trained checkpoint")
    parser.add_argument("--planes", type=int, default=16, help="z planes (default 16)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    group = zarr.open_group(args.volume, mode="r")
    image, truth = np.asarray(group["image"][:]), np.asarray(group["labels"][:])
    norm = fit_normalization(image)
    if not is_masked(support_of(norm)):
        sys.exit(f"{args.volume}: no masked background; nothing to skip")
    model, ckpt = load_inference_model(args.model)
    context = int(ckpt["model"].get("context_slices", 1))
    rows, raw = [], {}
    for axis in ("z", "y"):
        planes = np.moveaxis(image, "zyx".index(axis), 0)
        target = np.moveaxis(truth, "zyx".index(axis), 0)
        if axis == "z":
            lo = max(0, len(planes) // 2 - args.planes // 2)
            planes, target = planes[lo:lo + args.planes], target[lo:lo + args.planes]
        results = {}
        for mode in ("every plane", "skip empty", "window 32"):
            t0 = time.perf_counter()
            labels = segment(model, planes, norm, context, mode)
            seconds = time.perf_counter() - t0
            cm = confusion_matrix(torch.from_numpy(labels.astype(np.int64)),
                                  torch.from_numpy(target.astype(np.int64)), 3)
            results[mode] = (labels, seconds, float(scores_from_confusion(cm)["miou"]))
        base_labels, base_seconds, _ = results["every plane"]
        sample = int((target != 0).sum())
        for mode, (labels, seconds, miou) in results.items():
            differ = int((labels != base_labels).sum())
            raw[f"{axis}/{mode}"] = {"planes": len(planes), "seconds": seconds, "miou": miou,
                                     "labels_differing": differ, "sample_voxels": sample}
            rows.append(f"| {axis} | {len(planes)} of {planes.shape[1]}x{planes.shape[2]} | "
                        f"{mode} | {seconds:.1f} | {base_seconds / seconds:.2f}x | {miou:.4f} | "
                        f"{differ} ({100 * differ / sample:.2f} % of the sample) |")
            print(rows[-1], flush=True)
    body = "\n".join([
        f"Volume `{args.volume}` {tuple(image.shape)}, model `{args.model}` "
        f"(context {context}); one torch thread, batch 8, the same planes each way.",
        "",
        "| axis | planes | mode | seconds | speed vs every plane | mIoU (these planes) | "
        "labels differing from every plane |",
        "|---|---|---|---|---|---|---|",
        *rows,
    ])
    path = write_results("masked", "Skipping background-only planes of a masked volume",
                         body, raw)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
