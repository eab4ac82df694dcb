"""The model layer: a model's settings as one schema (``ModelConfig``, the one place for their
defaults and checks) and ``build_model(ModelConfig)``, the one entry point the rest of the code
uses, for DeepLabV3+ (``models/deeplab.py``) or SAM ViT-B/L/H and a tiny test variant
(``models/sam.py``).

The experiment config's ``model`` section, ``build_model``'s argument and a checkpoint's
``model`` entry are all read by ``ModelConfig.from_dict``, which refuses an unknown key or a
wrong value in one line naming the key and the fix.

Some values are automatic until a model is built: ``norm: auto`` (GroupNorm on a masked
training volume, BatchNorm otherwise; ``train.setup.resolve_norm`` decides it from the
volume), ``deep_stem: null`` (per backbone) and the SAM keys left null (the variant's values).
``ModelConfig.resolved`` is the one step that decides them; ``build_model`` builds a resolved
config (refusing a ``norm`` still ``auto``) and a checkpoint stores it (``model.config``,
``to_dict``). An experiment's ``config.yaml`` keeps the values as written (``section``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from torch import nn

from magseg_hpc.errors import MagsegError
from magseg_hpc.models.deeplab import BACKBONES, DeepLabV3Plus, load_pretrained_backbone
from magseg_hpc.models.sam import (
    SAM_ARCHITECTURE_KEYS,
    SAM_NAMES,
    SAM_VARIANTS,
    SamSemantic,
    load_sam_weights,
)

__all__ = ["ARCHITECTURE_KEYS", "MODEL_NAMES", "ModelConfig", "build_model", "param_groups"]

MODEL_NAMES = ("deeplabv3plus", *SAM_NAMES)
NORMS = ("batch", "group", "auto")


@dataclass(frozen=True)
class ModelConfig:
    """Every model's keys, with their defaults; ``from_dict`` checks a mapping into one."""

    # both families
    name: str = "deeplabv3plus"  # or a SAM variant: sam_vit_b, sam_vit_l, sam_vit_h, sam_tiny
    num_classes: int = 3  # an experiment's comes from its class table
    in_channels: int = 1  # per slice (grey volumes: 1; SAM: 1)
    # DeepLab: a local torchvision ImageNet ResNet state_dict; SAM: the official weights file
    # (e.g. sam_vit_b_01ec64.pth; ``checkpoint`` is its other name). null: random init
    pretrained: str | None = None
    # DeepLabV3+ (models/deeplab.py)
    backbone: str = "resnet101"  # resnet10, resnet18, resnet50 or resnet101
    # 2.5D: the slice and (context_slices - 1) / 2 neighbours on each side along the slicing
    # axis as input channels (odd; 1 = plain 2D). segment-volume reads the same context.
    context_slices: int = 1
    # ASPP and decoder width: 256 as the study; 64 trains about 3x faster on a CPU.
    decoder_channels: int = 256
    # channels of the first ResNet stage (the later ones 2x, 4x, 8x): 64 as ImageNet's
    # ResNets (needed for pretrained weights); less is a lighter, faster random-init model
    width: int = 64
    deep_stem: bool | None = None  # null: the AugSeg deep stem for resnet50/101, not 10/18
    output_stride: int = 16  # only 16 (the study's)
    zero_init_residual: bool = True  # zero last BN gamma per block (AugSeg); pretrained overwrites
    # batch (the study's BatchNorm), group (GroupNorm, no running statistics) or auto: group
    # on a masked training volume unless ImageNet weights are loaded, else batch (resolved)
    norm: str = "batch"
    # SAM (models/sam.py); null: the variant's value (SAM_VARIANTS)
    image_size: int | None = None  # input size (1024 for the official variants)
    box_jitter: float | None = None  # box prompt jitter in pixels, training only (20)
    encoder_embed_dim: int | None = None
    encoder_depth: int | None = None
    encoder_num_heads: int | None = None
    encoder_global_attn_indexes: list[int] | None = None
    patch_size: int | None = None
    window_size: int | None = None
    prompt_embed_dim: int | None = None
    decoder_depth: int | None = None
    decoder_mlp_dim: int | None = None
    decoder_num_heads: int | None = None

    @property
    def is_sam(self) -> bool:
        return self.name in SAM_NAMES

    @classmethod
    def from_dict(cls, raw: Mapping) -> ModelConfig:
        """A checked config from a mapping of some of the keys (the rest keep their
        defaults); ``checkpoint`` is accepted as the other name of ``pretrained``."""
        if not isinstance(raw, Mapping):
            raise MagsegError(f"model config must be a mapping, got {type(raw).__name__}")
        values = _pretrained_alias(dict(raw))
        name = values.get("name", cls.name)
        if name not in MODEL_NAMES:
            raise MagsegError(f"model.name {name!r} is not one of {list(MODEL_NAMES)}")
        keys = _family_keys(name in SAM_NAMES)
        unknown = sorted(set(values) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise MagsegError(f"unknown model config key(s) {unknown} for {name}; valid keys: "
                              f"{_help(keys)}")
        cfg = cls(**{k: _checked(k, v) for k, v in values.items()})
        cfg._check_family(keys)
        if cfg.is_sam:
            _check_sam(cfg.resolved())
        else:
            cfg._check_deeplab()
        return cfg

    def resolved(self, masked: bool | None = None) -> ModelConfig:
        """The config with every automatic value decided: the one step that does.

        ``masked``: whether the training volume is masked (``volume.support``), which decides
        ``norm: auto``; a config that still says auto needs it. Resolving twice is a no-op.
        """
        if self.is_sam:
            preset = SAM_VARIANTS[self.name]
            return dataclasses.replace(self, **{k: _plain(preset[k]) for k in _SAM_KEYS
                                                if getattr(self, k) is None})
        norm = self.norm
        if norm == "auto":
            if masked is None:
                raise MagsegError("model.norm auto is decided by the training volume (group on "
                                  "a masked one, else batch); give model.norm batch or group")
            # ImageNet weights were trained with BatchNorm and keep it
            norm = "group" if masked and not self.pretrained else "batch"
        deep_stem = (BACKBONES[self.backbone][0] == "bottleneck" if self.deep_stem is None
                     else self.deep_stem)
        return dataclasses.replace(self, norm=norm, deep_stem=deep_stem)

    def to_dict(self) -> dict:
        """The keys of this model's family: a checkpoint's ``model`` entry (resolved)."""
        return {k: _plain(getattr(self, k)) for k in _family_keys(self.is_sam)}

    def section(self) -> dict:
        """Every key as configured (automatic values unresolved), the class count left to
        the class table: an experiment config's ``model`` section."""
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)
                if f.name != "num_classes"}

    def _check_family(self, keys: tuple[str, ...]) -> None:
        """Keys of the other family stay at their defaults (the experiment config sends
        every key)."""
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name not in keys and value is not None and value != f.default:
                raise MagsegError(f"model.{f.name}={value!r} does not apply to {self.name}; "
                                  f"remove it (its keys: {', '.join(keys)})")

    def _check_deeplab(self) -> None:
        if self.context_slices % 2 == 0:
            raise MagsegError(f"model.context_slices must be odd (the slice in the middle), "
                              f"got {self.context_slices}")
        if self.output_stride != 16:
            raise MagsegError(f"model.output_stride {self.output_stride!r} is not supported; "
                              "use 16")
        if self.pretrained and self.width != 64:
            raise MagsegError(f"model.width {self.width} cannot start from ImageNet weights "
                              "(their ResNets have width 64); use width 64 or pretrained: null")
        if self.pretrained and self.norm == "group":
            raise MagsegError("model.norm group cannot start from ImageNet weights (they were "
                              "trained with BatchNorm); use model.norm: batch or pretrained: null")


_COMMON_KEYS = ("name", "num_classes", "in_channels", "pretrained")
_DEEPLAB_KEYS = ("backbone", "context_slices", "decoder_channels", "width", "deep_stem",
                 "output_stride", "zero_init_residual", "norm")
_SAM_KEYS = ("box_jitter", *SAM_ARCHITECTURE_KEYS)
# Keys that define the architecture: a checkpoint is refused when these differ.
ARCHITECTURE_KEYS = ("name", "num_classes", "in_channels", "backbone", "context_slices",
                     "decoder_channels", "width", "deep_stem", "output_stride", "norm",
                     *SAM_ARCHITECTURE_KEYS)

_POSITIVE = ("num_classes", "in_channels", "context_slices", "decoder_channels", "width",
             "output_stride", *(k for k in SAM_ARCHITECTURE_KEYS
                                if k != "encoder_global_attn_indexes"))
_CHOICES = {"backbone": tuple(BACKBONES), "norm": NORMS}


def _family_keys(sam: bool) -> tuple[str, ...]:
    return (*_COMMON_KEYS, *(_SAM_KEYS if sam else _DEEPLAB_KEYS))


def _help(keys: tuple[str, ...]) -> str:
    return ", ".join(f"{k}={getattr(ModelConfig, k)!r}" for k in keys)


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def _pretrained_alias(values: dict) -> dict:
    """``checkpoint`` (SAM's word for its weights file) as ``pretrained``."""
    if "checkpoint" not in values:
        return values
    ckpt = values.pop("checkpoint")
    if ckpt is not None and values.get("pretrained") not in (None, ckpt):
        raise MagsegError(f"model.checkpoint {ckpt!r} and model.pretrained "
                          f"{values['pretrained']!r} differ; they are the same setting (the "
                          "weights file), give one")
    if ckpt is not None:
        values["pretrained"] = ckpt
    return values


def _checked(key: str, value: Any) -> Any:
    """One key's value checked (and made canonical: a float jitter, null for "none")."""
    if key in _CHOICES and value not in _CHOICES[key]:
        raise MagsegError(f"model.{key} {value!r} is not one of {list(_CHOICES[key])}")
    if value is None and key in ("pretrained", "deep_stem", *_SAM_KEYS):
        return None
    if key in _POSITIVE and (not isinstance(value, int) or isinstance(value, bool)
                             or value < 1):
        raise MagsegError(f"model.{key} must be a positive integer, got {value!r}")
    if key in ("deep_stem", "zero_init_residual") and not isinstance(value, bool):
        raise MagsegError(f"model.{key} must be true or false, got {value!r}")
    if key == "pretrained":
        if not isinstance(value, str):
            raise MagsegError(f"model.pretrained must be a file path or null, got {value!r}")
        return None if value.strip().lower() in ("", "none", "null") else value
    if key == "box_jitter":
        if isinstance(value, bool) or not isinstance(value, int | float) or not value >= 0:
            raise MagsegError(f"model.box_jitter must be >= 0 (pixels), got {value!r}")
        return float(value)
    if key == "encoder_global_attn_indexes":
        if not isinstance(value, list | tuple) or not all(
                isinstance(i, int) and not isinstance(i, bool) for i in value):
            raise MagsegError(f"model.encoder_global_attn_indexes must be a list of block "
                              f"indexes, got {value!r}")
        return [int(i) for i in value]
    return value


def _check_sam(cfg: ModelConfig) -> None:
    """A resolved SAM config's sizes fit each other."""
    if cfg.in_channels != 1:
        raise MagsegError(f"model.in_channels must be 1 for SAM (grey slices), got "
                          f"{cfg.in_channels!r}")
    if cfg.num_classes < 2:
        raise MagsegError(f"SAM needs num_classes >= 2 (background + classes), got "
                          f"{cfg.num_classes}")
    if cfg.image_size % cfg.patch_size:
        raise MagsegError(f"model.image_size {cfg.image_size} must be a multiple of "
                          f"model.patch_size {cfg.patch_size}")
    if cfg.prompt_embed_dim % 8:
        raise MagsegError(f"model.prompt_embed_dim must be a multiple of 8, got "
                          f"{cfg.prompt_embed_dim}")
    if cfg.encoder_embed_dim % cfg.encoder_num_heads:
        raise MagsegError("model.encoder_embed_dim must be a multiple of encoder_num_heads")
    if not all(0 <= i < cfg.encoder_depth for i in cfg.encoder_global_attn_indexes):
        raise MagsegError(f"model.encoder_global_attn_indexes must be block indexes below "
                          f"encoder_depth {cfg.encoder_depth}, got "
                          f"{cfg.encoder_global_attn_indexes!r}")


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
