"""Does orthoplane fusion help this model? Measured once, when training ends, on the held-out
validation slices, and stored in best.pt for segment-volume's ``--axes auto``.

Whether fusing the y and x planes of a model trained on all three gains or loses depends on
the data, not on one number known before training: with 2 labelled slices of 64 it gained
0.047 mIoU on the `elongated` phantoms (3 seeds), with 8 of 213 on a real-size `sweep` it
lost 0.009 (benchmarks/results/phantom_2slices.md, phantom_realsize.md). So the best teacher
segments the validation slices both ways, exactly as segment-volume would (the kernel, whole
planes, the masked support decided on the labelled-axis slices, uint8 probabilities fused by
their mean), and the two mIoUs go into best.pt as ``fusion_check``.

Cost: the model runs over every y and x plane of the validation volume once (planes holding
only masked background are skipped), about two thirds of a fused segmentation of it.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import torch

from magseg_hpc.axes import AXES
from magseg_hpc.classes import IGNORE_LABEL
from magseg_hpc.data.normalize import refit_normalization
from magseg_hpc.metrics import confusion_matrix, scores_from_confusion
from magseg_hpc.models.checkpoint import fuses, load_inference_model, save_checkpoint
from magseg_hpc.segment import kernel
from magseg_hpc.volume.support import support_of

log = logging.getLogger(__name__)

PLANES_PER_CALL = 16  # planes per kernel call: bounds the probabilities held at once


def _probabilities(model, planes: np.ndarray, norm: dict, num_classes: int, context: int,
                   device, start: int, count: int, precision: str) -> np.ndarray:
    """uint8 probabilities (C, count, H, W) of ``planes[start:start + count]``, whole planes,
    the masked background left to the caller (as in an orthoplane run)."""
    return kernel.segment_slab(model, planes, norm, num_classes=num_classes, device=device,
                               with_probabilities=True, context=context, before=start,
                               count=count, force_support=False, precision=precision)[1]


def measure_fusion(model: torch.nn.Module, image, labels: dict[int, np.ndarray], *,
                   axis: str, axes: list[str], normalization: dict, num_classes: int,
                   context: int, device="cpu", precision: str = "fp32") -> dict:
    """mIoU of the validation slices ``labels`` ({index along ``axis``: (H, W) labels}) of
    the volume ``image`` (z, y, x), segmented along ``axis`` alone and fused over ``axes``."""
    vol = np.moveaxis(np.asarray(image), AXES.index(axis), 0)  # the labelled axis first
    rows = np.array(sorted(labels))
    truth = np.stack([labels[i] for i in rows])

    # one pass per validation slice gives both: the support changes only pixels outside the
    # sample, which the fusion below sets to background anyway
    alone_runs = [kernel.segment_slab(model, vol, normalization, num_classes=num_classes,
                                      device=device, with_probabilities=True, context=context,
                                      before=int(i), count=1, precision=precision)
                  for i in rows]
    alone = np.concatenate([labels for labels, _ in alone_runs])
    parts = [np.concatenate([probs for _, probs in alone_runs], axis=1)]
    others = [a for a in AXES if a in axes and a != axis]
    for other in others:
        dim = 1 + [a for a in AXES if a != axis].index(other)  # its dim in vol
        planes = np.moveaxis(vol, dim, 0)
        chunks = []
        for start in range(0, planes.shape[0], PLANES_PER_CALL):
            count = min(PLANES_PER_CALL, planes.shape[0] - start)
            probs = _probabilities(model, planes, normalization, num_classes, context, device,
                                   start, count, precision)  # (C, count, vol's other two dims)
            chunks.append(np.moveaxis(probs, 1, 1 + dim)[:, rows])  # back to vol's order
        parts.append(np.concatenate(chunks, axis=1 + dim))
    outside = kernel.support_outside(vol[rows], support_of(normalization))
    fused, _ = kernel.fuse_probabilities(parts, outside)

    def miou(pred: np.ndarray) -> float:
        return float(scores_from_confusion(
            confusion_matrix(pred, truth, num_classes, ignore=IGNORE_LABEL))["miou"])

    return {"axis": axis, "axes": [axis, *others], "slices": [int(i) for i in rows],
            "axis_miou": miou(alone), "fused_miou": miou(fused)}


def check_fusion(model: torch.nn.Module, source, val_keys, *, axes: list[str],
                 num_classes: int, context: int, trained_normalization: dict,
                 device="cpu", precision: str = "fp32") -> dict:
    """``measure_fusion`` on the validation slices ``val_keys`` of ``source`` (a volume's
    slices; a MultiAxisSlices' labelled-axis volume), normalised as segment-volume's default
    (fitted on that volume, the model's input encoding kept), with the seconds it took."""
    volume = getattr(source, "primary", source)
    image = np.asarray(volume.image_volume())
    started = time.perf_counter()
    result = measure_fusion(
        model, image, {int(k): volume.read_labels(k) for k in val_keys}, axis=volume.axis,
        axes=axes, normalization=refit_normalization(  # the training's support decision
            image, trained_normalization, support=support_of(trained_normalization)),
        num_classes=num_classes,
        context=context, device=device, precision=precision)
    return dict(result, seconds=time.perf_counter() - started)


def record_fusion_check(best_path, source, val_keys, axes: list[str], num_classes: int,
                        device, precision: str = "fp32") -> dict | None:
    """Measure fusion for best.pt's teacher on the validation slices ``val_keys`` of
    ``source`` (the validation volume) and store it in best.pt; kept when best.pt already
    holds the check for its iteration (a finished run resumed)."""
    if not best_path.is_file() or not val_keys:
        return None
    model, ckpt = load_inference_model(best_path, device)
    iteration = ckpt["metrics"].get("best", {}).get("iteration")
    old = ckpt.get("fusion_check")
    if old and old.get("iteration") == iteration:
        return old
    result = check_fusion(model, source, val_keys, axes=axes, num_classes=num_classes,
                          context=int(ckpt["model"].get("context_slices", 1)),
                          trained_normalization=ckpt["normalization"], device=device,
                          precision=precision)
    result["iteration"] = iteration
    save_checkpoint(best_path, {**ckpt, "fusion_check": result})
    trained = ckpt["metrics"].get("best", {}).get("teacher_miou")
    log.info("orthoplane check on %d validation slices: %s alone mIoU %.4f, fused %s %.4f "
             "(%.0f s); segment-volume --axes auto will use %s", len(result["slices"]),
             result["axis"], result["axis_miou"], ",".join(result["axes"]),
             result["fused_miou"], result["seconds"],
             ",".join(result["axes"]) if fuses(result) else result["axis"])
    if trained is not None:
        # the same teacher (best.pt, iteration N) scored two ways: why the numbers differ
        log.info("(best.pt scored %.4f on these slices during training: model input alone; "
                 "%.4f along %s is segment-volume's output, with the masked-support rule and "
                 "intensity statistics fitted on the validation volume)", trained,
                 result["axis_miou"], result["axis"])
    return result


