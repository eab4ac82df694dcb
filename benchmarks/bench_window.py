"""The support window on a masked reconstruction: time and agreement against whole planes.

On a masked volume (everything outside the sample exactly one value) ``segment_slab`` runs the
model only on a window around each batch's non-masked pixels (``kernel.support_window``).
This runs, in one process with one torch thread, the same planes through the same trained
model twice: with the window (what segment-volume does) and on whole planes (the window
replaced by the full plane), along z and along y, and reports the time ratio and how many
support voxels get a different label (the window's only possible effect: the model sees
less background around the sample).

Usage (a real-size sweep and a checkpoint trained on another seed of it):

    magseg-hpc make-phantom s0.zarr --preset sweep --shape 213,600,600 --seed 0
    magseg-hpc make-phantom s1.zarr --preset sweep --shape 213,600,600 --seed 1
    magseg-hpc train --config configs/cpu_best.yaml --output-dir best data.volume=s0.zarr
    .venv/bin/python benchmarks/bench_window.py --volume s1.zarr --model best/best.pt

Writes ``benchmarks/results/window.md`` (and ``window.json``).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _results import write_results  # noqa: E402

from magseg_hpc.data.normalize import fit_normalization  # noqa: E402
from magseg_hpc.models.checkpoint import load_inference_model  # noqa: E402
from magseg_hpc.segment import kernel  # noqa: E402
from magseg_hpc.volume.io import open_volume  # noqa: E402


def run(model, planes, norm, context, whole: bool) -> tuple[np.ndarray, float]:
    original = kernel.support_window
    if whole:
        kernel.support_window = lambda raw, masked: (slice(None), slice(None))
    try:
        t0 = time.perf_counter()
        labels, _ = kernel.segment_slab(model, planes, norm, num_classes=3, batch_size=8,
                                        context=context)
        return labels, time.perf_counter() - t0
    finally:
        kernel.support_window = original


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--volume", required=True, help="masked input zarr (image variable)")
    parser.add_argument("--model", required=True, help="trained checkpoint")
    parser.add_argument("--planes", type=int, default=16, help="planes per axis (default 16)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    image = np.asarray(open_volume(args.volume, None).data)
    norm = fit_normalization(image)
    if norm.get("masked_value") is None:
        sys.exit(f"{args.volume}: no masked background; the window only acts on masked volumes")
    model, ckpt = load_inference_model(args.model)
    context = int(ckpt["model"].get("context_slices", 1))
    rows, raw = [], {}
    for axis in ("z", "y"):
        planes = np.moveaxis(image, "zyx".index(axis), 0)
        # consecutive planes through the middle of the volume (y: through the sample)
        mid = planes.shape[0] // 2
        lo = max(0, mid - args.planes // 2)
        chunk = planes[lo:lo + args.planes]
        windowed, t_window = run(model, chunk, norm, context, whole=False)
        whole, t_whole = run(model, chunk, norm, context, whole=True)
        support = windowed != 0
        support |= whole != 0
        differ = int((windowed != whole).sum())
        raw[axis] = {"planes": int(len(chunk)), "plane_shape": list(chunk.shape[1:]),
                     "seconds_window": t_window, "seconds_whole": t_whole,
                     "speedup": t_whole / t_window, "voxels_differing": differ,
                     "sample_voxels": int(support.sum())}
        rows.append(f"| {axis} | {len(chunk)} of {chunk.shape[1]}x{chunk.shape[2]} | "
                    f"{t_whole:.1f} | {t_window:.1f} | {t_whole / t_window:.1f}x | "
                    f"{differ} of {int(support.sum())} "
                    f"({100 * differ / max(1, int(support.sum())):.3f} %) |")
        print(rows[-1], flush=True)
    body = "\n".join([
        f"Volume `{args.volume}` {tuple(image.shape)}, model `{args.model}` "
        f"(context {context}); one torch thread, batch 8, the same planes twice.",
        "",
        "| axis | planes | whole planes s | window s | speedup | labels that differ (of "
        "voxels either calls sample) |",
        "|---|---|---|---|---|---|",
        *rows,
    ])
    path = write_results("window", "Support window on a masked volume", body, raw)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
