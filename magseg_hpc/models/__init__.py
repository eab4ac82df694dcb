"""Model builders. ``build_model(ModelConfig)`` is the one entry point the rest of the code uses.

A model's keys, their defaults and their checks are ``ModelConfig``'s (``models/schema.py``):
DeepLabV3+ (``models/deeplab.py``) or SAM ViT-B/L/H and a tiny test variant
(``models/sam.py``). ``build_model`` builds ``config.resolved()``: a config whose
``norm`` is still ``auto`` is refused, since the training volume decides it
(``train.setup.resolve_norm``); checkpoints hold the resolved config (``model.config``).
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import nn

from magseg_hpc.models.deeplab import DeepLabV3Plus, load_pretrained_backbone
from magseg_hpc.models.sam import SamSemantic, load_sam_weights
from magseg_hpc.models.schema import ARCHITECTURE_KEYS, MODEL_NAMES, ModelConfig

__all__ = ["ARCHITECTURE_KEYS", "MODEL_NAMES", "ModelConfig", "build_model", "param_groups"]


def build_model(config: ModelConfig | Mapping) -> nn.Module:
    """Build the model for ``config`` (a ``ModelConfig``, or a mapping of its keys); input
    (B, in_channels, H, W) float32 normalised, output logits (B, num_classes, H, W).
    ``model.config`` holds the resolved config as a dict."""
    if not isinstance(config, ModelConfig):
        config = ModelConfig.from_dict(config)
    cfg = config.resolved()
    if cfg.is_sam:
        model = SamSemantic(cfg)
        if cfg.pretrained:
            load_sam_weights(model, cfg.pretrained)
        return model
    model = DeepLabV3Plus(cfg)
    if cfg.pretrained:
        load_pretrained_backbone(model.backbone, cfg.pretrained)
    return model


def param_groups(model: nn.Module, lr: float, head_lr_mult: float) -> list[dict]:
    """Parameter groups: backbone at ``lr``, decoder at ``lr * head_lr_mult``.

    For SAM the "backbone" is the image encoder and the "head" the mask decoder (the frozen
    prompt encoder and IoU head are left out).

    Each group carries "base_lr" (its lr before the poly schedule) and "name".

    Accepts a DDP-wrapped model. ``head_lr_mult`` is a config value (the study's code gave
    the head 10x for every dataset by mistake).
    """
    model = getattr(model, "module", model)
    encoder = model.image_encoder if hasattr(model, "image_encoder") else model.backbone
    backbone = [p for p in encoder.parameters() if p.requires_grad]
    backbone_ids = {id(p) for p in encoder.parameters()}
    head = [p for p in model.parameters() if p.requires_grad and id(p) not in backbone_ids]
    return [
        {"params": backbone, "lr": lr, "base_lr": lr, "name": "backbone"},
        {"params": head, "lr": lr * head_lr_mult, "base_lr": lr * head_lr_mult, "name": "head"},
    ]
