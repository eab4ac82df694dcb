"""Supervised segmentation losses: cross-entropy plus an optional soft Dice term.

The SAM fine-tune of the original study used Dice + BCE on one sigmoid mask; with one logit
map per class the multi-class equivalent is softmax cross-entropy + soft Dice, both ignoring
``IGNORE_LABEL`` pixels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from magseg_hpc.classes import IGNORE_LABEL


def dice_loss(logits: torch.Tensor, target: torch.Tensor, ignore_index: int = IGNORE_LABEL,
              smooth: float = 1.0) -> torch.Tensor:
    """1 - mean over classes of the soft Dice between softmax(logits) and one-hot(target).

    Sums run over the whole batch (not per image), so a class absent from one slice does not
    dominate; ``smooth`` keeps a class absent from prediction and target at Dice 1.
    """
    num_classes = logits.shape[1]
    probs = torch.softmax(logits.float(), dim=1)
    valid = (target != ignore_index).unsqueeze(1)
    onehot = F.one_hot(torch.where(valid[:, 0], target, 0).long(), num_classes)
    onehot = onehot.permute(0, 3, 1, 2).to(probs.dtype) * valid
    probs = probs * valid
    dims = (0, 2, 3)
    inter = (probs * onehot).sum(dims)
    total = probs.sum(dims) + onehot.sum(dims)
    return 1.0 - ((2.0 * inter + smooth) / (total + smooth)).mean()


def supervised_loss(logits: torch.Tensor, target: torch.Tensor, dice_weight: float = 0.0,
                    ignore_index: int = IGNORE_LABEL) -> torch.Tensor:
    """Cross-entropy (ignoring ``ignore_index``) plus ``dice_weight`` times the soft Dice loss."""
    loss = F.cross_entropy(logits, target, ignore_index=ignore_index)
    if dice_weight:
        loss = loss + dice_weight * dice_loss(logits, target, ignore_index)
    return loss
