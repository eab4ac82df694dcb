"""A conservative painter for the published sweep: what a physicist paints without doubt.

Stands in for the hand in the labelling loop (export-slices -> paint -> import-masks) and
defines the "clear voxels" the real-data benchmark scores on. Only unambiguous pixels get a
class; everything near a domain wall or the sample's edge stays unlabelled (255):

- background: outside the slice's sample support (the convex hull of its non-masked pixels:
  ``volume.support.plane_support``) by more than ``EDGE`` px;
- domain_minus / domain_plus: at least ``EDGE`` px inside the support, where the slice
  smoothed over ~1.5 px is clearly dark (< ``DARK``) or clearly bright (> ``BRIGHT``), then
  shrunk by ``WALL`` px away from every wall; specks under ``MIN_AREA`` px are dropped.

A grey level of 0 inside the support is a dark domain here, never outside.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from magseg_hpc.volume.support import plane_support

EDGE = 4        # px kept unlabelled on both sides of the support's edge
DARK = 25       # 8-bit grey levels, on the 1.5 px smoothed slice
BRIGHT = 110
WALL = 2        # px shrunk away from domain walls
MIN_AREA = 30   # px


def _disk(r: int) -> np.ndarray:
    return np.hypot(*np.mgrid[-r:r + 1, -r:r + 1]) <= r


def clear_labels(plane: np.ndarray, masked_value: float = 0.0) -> np.ndarray:
    """uint8 labels of one 2D slice: 0/1/2 where unambiguous, 255 elsewhere."""
    plane = np.asarray(plane, np.float32)
    support = plane_support(plane, {"outside": "value", "value": masked_value})
    labels = np.full(plane.shape, 255, np.uint8)
    labels[~ndimage.binary_dilation(support, _disk(EDGE))] = 0
    inner = ndimage.binary_erosion(support, _disk(EDGE))
    smooth = ndimage.gaussian_filter(plane, 1.5)
    for cls, region in ((1, inner & (smooth < DARK)), (2, inner & (smooth > BRIGHT))):
        region = ndimage.binary_erosion(region, _disk(WALL))
        parts, n = ndimage.label(region)
        if n:
            sizes = ndimage.sum(region, parts, index=np.arange(1, n + 1))
            region = np.isin(parts, 1 + np.flatnonzero(sizes >= MIN_AREA))
        labels[region] = cls
    return labels
