"""Model builders. ``build_model(model_cfg)`` is the one entry point the rest of the code uses.

Model config keys (``resolve_model_config`` fills defaults and rejects anything else):

| key | default | meaning |
|---|---|---|
| name | "deeplabv3plus" | "deeplabv3plus", or SAM: sam_vit_b, sam_vit_l, sam_vit_h, sam_tiny |
| backbone | "resnet101" | resnet18, resnet50 or resnet101 |
| num_classes | 3 | output channels |
| in_channels | 1 | input channels per slice (grey volumes: 1) |
| context_slices | 1 | odd; the slice and its neighbours along the slicing axis as channels (2.5D) |
| pretrained | None | local path of a torchvision ImageNet ResNet state_dict, or None |
| deep_stem | True for resnet50/101, False for resnet18 | ResNet-C stem (AugSeg) |
| output_stride | 16 | only 16 (the study's setting) |
| decoder_channels | 256 | ASPP and decoder width (the study: 256; 64 trains ~3x faster on CPU) |
| zero_init_residual | True | zero last BN gamma per block (AugSeg); pretrained overwrites it |
| norm | "batch" | batch (the study's BatchNorm) or group (GroupNorm, no running stats) |

A config's ``model.norm: auto`` is resolved per training volume before a model is built
(``train.setup.resolve_norm``): checkpoints hold batch or group.

SAM models (``magseg_hpc.models.sam``) take name, num_classes, in_channels (1),
``checkpoint`` (alias ``pretrained``: the official ``sam_vit_b_01ec64.pth`` or null),
``image_size`` (1024), ``box_jitter`` (20 px, training only) and the architecture overrides
listed in ``sam.SAM_DEFAULTS`` (the variant presets fill them). The DeepLab-only keys above
are accepted for SAM only at their defaults (the experiment config always sends them).
"""

from __future__ import annotations

from torch import nn

from magseg_hpc.errors import MagsegError
from magseg_hpc.models.deeplab import BACKBONES, NORMS, DeepLabV3Plus, load_pretrained_backbone
from magseg_hpc.models.sam import (
    SAM_ARCHITECTURE_KEYS,
    SAM_NAMES,
    SamSemantic,
    load_sam_weights,
    resolve_sam_config,
)

MODEL_NAMES = ("deeplabv3plus", *SAM_NAMES)
# Keys that define the architecture: a checkpoint is refused when these differ (a key a model
# family lacks compares as None).
ARCHITECTURE_KEYS = (
    "name", "backbone", "num_classes", "in_channels", "context_slices", "deep_stem",
    "output_stride", "decoder_channels", "norm", *SAM_ARCHITECTURE_KEYS,
)
_DEFAULTS = {
    "name": "deeplabv3plus",
    "backbone": "resnet101",
    "num_classes": 3,
    "in_channels": 1,
    "context_slices": 1,
    "pretrained": None,
    "deep_stem": None,  # resolved per backbone
    "output_stride": 16,
    "decoder_channels": 256,
    "zero_init_residual": True,
    "norm": "batch",
}

__all__ = ["ARCHITECTURE_KEYS", "build_model", "param_groups", "resolve_model_config"]


def resolve_model_config(model_cfg: dict) -> dict:
    """Return a complete, validated model config (defaults filled in)."""
    if not isinstance(model_cfg, dict):
        raise MagsegError(f"model config must be a mapping, got {type(model_cfg).__name__}")
    name = model_cfg.get("name", _DEFAULTS["name"])
    if name not in MODEL_NAMES:
        raise MagsegError(f"model.name {name!r} is not one of {list(MODEL_NAMES)}")
    if name in SAM_NAMES:
        return resolve_sam_config(model_cfg, _DEFAULTS)
    unknown = sorted(set(model_cfg) - set(_DEFAULTS))
    if unknown:
        raise MagsegError(
            f"unknown model config key(s) {unknown} for {name}; valid keys: {sorted(_DEFAULTS)} "
            f"(SAM models take others: see magseg_hpc.models.sam)"
        )
    cfg = {**_DEFAULTS, **model_cfg}
    if cfg["backbone"] not in BACKBONES:
        raise MagsegError(f"model.backbone {cfg['backbone']!r} is not one of {sorted(BACKBONES)}")
    for key in ("num_classes", "in_channels", "context_slices", "decoder_channels"):
        if not isinstance(cfg[key], int) or isinstance(cfg[key], bool) or cfg[key] < 1:
            raise MagsegError(f"model.{key} must be a positive integer, got {cfg[key]!r}")
    if cfg["context_slices"] % 2 == 0:
        raise MagsegError(f"model.context_slices must be odd (the slice in the middle), got "
                          f"{cfg['context_slices']}")
    if cfg["output_stride"] != 16:
        raise MagsegError(f"model.output_stride {cfg['output_stride']!r} is not supported; use 16")
    if cfg["deep_stem"] is None:
        cfg["deep_stem"] = cfg["backbone"] != "resnet18"
    for key in ("deep_stem", "zero_init_residual"):
        if not isinstance(cfg[key], bool):
            raise MagsegError(f"model.{key} must be true or false, got {cfg[key]!r}")
    if cfg["norm"] not in NORMS:
        raise MagsegError(f"model.norm {cfg['norm']!r} is not one of {list(NORMS)}")
    pretrained = cfg["pretrained"]
    if isinstance(pretrained, str) and pretrained.strip().lower() in ("", "none", "null"):
        cfg["pretrained"] = None
    elif pretrained is not None and not isinstance(pretrained, str):
        raise MagsegError(f"model.pretrained must be a file path or null, got {pretrained!r}")
    if cfg["pretrained"] and cfg["norm"] != "batch":
        raise MagsegError("model.norm group cannot start from ImageNet weights (they were "
                          "trained with BatchNorm); use model.norm: batch or pretrained: null")
    return cfg


def build_model(model_cfg: dict) -> nn.Module:
    """Build the model for ``model_cfg``; input (B, in_channels, H, W) float32 normalised,
    output logits (B, num_classes, H, W). ``model.config`` holds the resolved config."""
    cfg = resolve_model_config(model_cfg)
    if cfg["name"] in SAM_NAMES:
        model = SamSemantic(cfg)
        if cfg["pretrained"]:
            load_sam_weights(model, cfg["pretrained"])
        return model
    model = DeepLabV3Plus(cfg)
    if cfg["pretrained"]:
        load_pretrained_backbone(model.backbone, cfg["pretrained"])
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
