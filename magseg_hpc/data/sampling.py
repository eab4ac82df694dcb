"""Which sample each rank sees at each step, and the random generators behind it.

Identical on every rank, so the oversampled labelled list agrees across ranks: one epoch is
one pass over the unlabelled list; the labelled list is repeated in fresh random orders up
to that length. A global batch of ``batch_size * world_size`` is cut into per-rank batches.
Each sample carries the key ``(epoch, position)``, its place in the epoch, and its
augmentation generator is derived from ``(seed, stream, epoch, position)``: the data
pipeline is a pure function of (seed, epoch, iteration, rank), so resuming needs no state and
the number of DataLoader workers does not change the result.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from magseg_hpc.errors import MagsegError

# Streams keep the random draws of different purposes independent.
STREAM_SPLIT, STREAM_UNLABELED_ORDER, STREAM_LABELED_ORDER = 1, 2, 3
STREAM_LABELED_AUG, STREAM_UNLABELED_AUG, STREAM_STEP = 4, 5, 6


@dataclass(frozen=True)
class EpochPlan:
    """Which samples each rank sees at each step of one epoch.

    ``labeled[s]`` / ``unlabeled[s]`` are this rank's batches at step ``s``: lists of
    ``(epoch, position, index)`` with ``index`` into the split list and ``position`` the
    sample's place in the epoch-wide order (unique across ranks).
    """

    epoch: int
    iters: int
    labeled: list[list[tuple[int, int, int]]]
    unlabeled: list[list[tuple[int, int, int]]]


def iters_per_epoch(n_labeled: int, n_unlabeled: int, batch_size: int, world_size: int) -> int:
    """Steps per epoch: one pass over the unlabelled list (the labelled one when longer)."""
    epoch_len = max(n_unlabeled, n_labeled)
    iters = epoch_len // (batch_size * world_size)
    if iters < 1:
        raise MagsegError(
            f"an epoch of {epoch_len} slices is shorter than one global batch "
            f"({batch_size} x {world_size} processes); lower train.batch_size or use more slices"
        )
    return iters


def _oversampled(n: int, length: int, rng: np.random.Generator) -> np.ndarray:
    """``length`` indices of ``0..n-1``: fresh random orders of the whole list, concatenated."""
    reps = math.ceil(length / n)
    return np.concatenate([rng.permutation(n) for _ in range(reps)])[:length]


def epoch_plan(
    epoch: int,
    *,
    n_labeled: int,
    n_unlabeled: int,
    batch_size: int,
    seed: int,
    rank: int = 0,
    world_size: int = 1,
    iters: int | None = None,
) -> EpochPlan:
    """This rank's batches for ``epoch``; the orders depend only on (seed, epoch).

    ``iters`` fixes the epoch's length in steps (train.iters_per_epoch) instead of one pass
    over the unlabelled list: shorter epochs see part of it, longer ones repeat it."""
    natural = iters_per_epoch(n_labeled, n_unlabeled, batch_size, world_size)
    iters = iters or natural
    epoch_len = max(n_unlabeled, n_labeled, iters * batch_size * world_size)
    lab_order = _oversampled(
        n_labeled, epoch_len, np.random.default_rng([seed, STREAM_LABELED_ORDER, epoch])
    )
    unl_order = (
        _oversampled(n_unlabeled, epoch_len,
                     np.random.default_rng([seed, STREAM_UNLABELED_ORDER, epoch]))
        if n_unlabeled else None
    )
    labeled, unlabeled = [], []
    for step in range(iters):
        start = (step * world_size + rank) * batch_size
        positions = range(start, start + batch_size)
        labeled.append([(epoch, p, int(lab_order[p])) for p in positions])
        if unl_order is not None:
            unlabeled.append([(epoch, p, int(unl_order[p])) for p in positions])
    return EpochPlan(epoch, iters, labeled, unlabeled)


def sample_rng(seed: int, stream: int, epoch: int, position: int) -> np.random.Generator:
    """The augmentation generator of one sample."""
    return np.random.default_rng([seed, stream, epoch, position])


def step_generator(seed: int, rank: int, iteration: int) -> torch.Generator:
    """The generator of the batch-level draws (CutMix) of one step on one rank."""
    state = np.random.SeedSequence([seed, STREAM_STEP, rank, iteration]).generate_state(2)
    g = torch.Generator()
    g.manual_seed(int(state[0]) << 32 | int(state[1]))
    return g
