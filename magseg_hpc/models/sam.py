"""Segment Anything (SAM ViT-B/L/H) as a semantic segmentation model for our class table.

Implementation: the building blocks of Meta's ``segment-anything`` package (``ImageEncoderViT``,
``PromptEncoder``, ``MaskDecoder``, ``TwoWayTransformer``), assembled as
``segment_anything.build_sam`` does and under the same attribute names, so the official
``sam_vit_{b,l,h}_*.pth`` state dicts load by key name. Only the batched mask-decoder call is
re-written here (``_decode``): the package's ``MaskDecoder.predict_masks`` repeats every image
embedding once per prompt in the batch, which is right for many prompts on one image but wrong
(B x B outputs) for one prompt per image.

Forward, (B, 1, H, W) normalised slices -> (B, C, H, W) logits:

1. **Pixel normalisation.** SAM maps RGB pixels ``p`` to ``(p - mean_c) / std_c`` (ImageNet
   statistics), i.e. to roughly zero-mean, unit-variance channels. Our input is already
   standardised (``data/normalize.py``: percentile clip to [0, 1], then ``(x01 - mean) / std``
   over the training sample), so a grey pixel re-expressed in SAM's pixel units,
   ``p_c = mean_c + std_c * x``, normalises back to exactly ``x`` in every channel. The model
   therefore replicates ``x`` to 3 channels unchanged; nothing of our normalisation is undone,
   and the same rule holds in training and inference because both go through the same
   checkpointed normalisation.
2. **Resize and pad** (SAM's ``ResizeLongestSide`` + ``preprocess``): the long side is resized
   to ``image_size`` (bilinear, antialiased when shrinking), then zero-padded at the bottom
   and right to a square. Zero is SAM's padding value after normalisation, i.e. the mean
   intensity, in both conventions.
3. **Box prompt** from the input itself (``support_boxes``): the bounding box of the sample
   support, jittered outward by U[0, box_jitter] input pixels per side in training mode.
4. **Image encoder** (trainable) -> **prompt encoder** (frozen) -> **mask decoder** (trainable)
   with ``num_multimask_outputs = num_classes - 1``, so it has ``num_classes`` mask tokens and
   every token is one class's logit map: token 0 (SAM's single-mask output, which for a box
   prompt segments the boxed object, i.e. the sample) is the background class, tokens 1..C-1
   (SAM's multi-mask outputs, sub-part masks) are the domain classes. When the official
   weights are loaded, token 0's hypernetwork output layer is negated, so the background
   logit starts as "not the boxed object" rather than "the object". A softmax over the tokens
   gives the class probabilities, so the classes compete as in any semantic model.
5. **Back to input size** (SAM's ``postprocess_masks``): the low-resolution logits
   (image_size / 4) are upsampled to image_size, the padding is cropped and the rest resized to
   (H, W).

The IoU-prediction head is kept (so the official file loads completely) but unused and frozen:
a trainable parameter without gradient would break DDP.
"""

from __future__ import annotations

import logging
import math
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from magseg_hpc.errors import MagsegError
from magseg_hpc.models.weights import read_weights

log = logging.getLogger(__name__)

# The official SAM settings (segment_anything.build_sam) that the variants share.
_OFFICIAL = {"image_size": 1024, "box_jitter": 20.0,  # the study: box jittered by 0-20 px
             "patch_size": 16, "window_size": 14, "prompt_embed_dim": 256, "decoder_depth": 2,
             "decoder_mlp_dim": 2048, "decoder_num_heads": 8}
# name -> every SAM key's value for that variant (a ModelConfig key left null takes it);
# sam_tiny is for tests and CPU demos.
SAM_VARIANTS: dict[str, dict] = {
    "sam_vit_b": {**_OFFICIAL, "encoder_embed_dim": 768, "encoder_depth": 12,
                  "encoder_num_heads": 12, "encoder_global_attn_indexes": [2, 5, 8, 11]},
    "sam_vit_l": {**_OFFICIAL, "encoder_embed_dim": 1024, "encoder_depth": 24,
                  "encoder_num_heads": 16, "encoder_global_attn_indexes": [5, 11, 17, 23]},
    "sam_vit_h": {**_OFFICIAL, "encoder_embed_dim": 1280, "encoder_depth": 32,
                  "encoder_num_heads": 16, "encoder_global_attn_indexes": [7, 15, 23, 31]},
    "sam_tiny": {**_OFFICIAL, "encoder_embed_dim": 32, "encoder_depth": 2,
                 "encoder_num_heads": 2, "encoder_global_attn_indexes": [1], "patch_size": 8,
                 "window_size": 4, "prompt_embed_dim": 32, "decoder_depth": 1,
                 "decoder_mlp_dim": 64, "decoder_num_heads": 2, "image_size": 64},
}
SAM_NAMES = tuple(SAM_VARIANTS)

# Keys that change the weights' shapes (or meaning): checkpoints are refused when they differ.
SAM_ARCHITECTURE_KEYS = (
    "image_size", "encoder_embed_dim", "encoder_depth", "encoder_num_heads",
    "encoder_global_attn_indexes", "patch_size", "window_size", "prompt_embed_dim",
    "decoder_depth", "decoder_mlp_dim", "decoder_num_heads",
)
# Support detection: fraction of the way from the background level to the 99th percentile.
SUPPORT_FRACTION = 0.3
_SUPPORT_GRID = 128  # the box is found on an area-downsampled copy at most this large


@torch.no_grad()
def support_boxes(x: torch.Tensor, fraction: float = SUPPORT_FRACTION) -> torch.Tensor:
    """Bounding box (x0, y0, x1, y1), inclusive pixel indices of the input, of each image's
    sample support; the whole image when no support stands out. Returns float32 (B, 4).

    The support is where the locally averaged absolute deviation from the background level
    (the median of the image border, where the field of view shows no sample) exceeds the
    border's own level by ``fraction`` of the way to the 99th percentile. Absolute deviation,
    not intensity, so that signed reconstructions (dark and bright domains around a zero
    background) are found as well as the phantoms' bright-on-dark samples; the local average
    stops noise from spreading the box.
    """
    b, _, h, w = x.shape
    x = x.float()
    scale = min(1.0, _SUPPORT_GRID / max(h, w))
    gh, gw = max(1, round(h * scale)), max(1, round(w * scale))
    small = F.interpolate(x, size=(gh, gw), mode="area") if (gh, gw) != (h, w) else x
    border = max(1, round(0.05 * min(gh, gw)))
    frame = torch.ones((gh, gw), dtype=torch.bool, device=x.device)
    frame[border:gh - border, border:gw - border] = False
    level = small[:, 0][:, frame].median(dim=1).values  # (B,)
    k = 2 * max(1, round(0.02 * max(gh, gw))) + 1
    dev = F.avg_pool2d((small - level[:, None, None, None]).abs(), k, stride=1, padding=k // 2,
                       count_include_pad=False)[:, 0]
    base = dev[:, frame].median(dim=1).values
    top = torch.quantile(dev.reshape(b, -1), 0.99, dim=1)
    thresh = base + fraction * (top - base)
    boxes = torch.tensor([[0.0, 0.0, w - 1.0, h - 1.0]], device=x.device).repeat(b, 1)
    for i in range(b):
        if not top[i] - base[i] > 1e-3 * (1.0 + top[i].abs()):
            continue  # flat image: no support stands out
        mask = dev[i] > thresh[i]
        rows = torch.nonzero(mask.any(dim=1)).flatten()
        cols = torch.nonzero(mask.any(dim=0)).flatten()
        if rows.numel() == 0:
            continue
        # grid cell [r, r+1) covers input rows [r/sy, (r+1)/sy)
        sy, sx = gh / h, gw / w
        boxes[i, 0] = math.floor(cols[0].item() / sx)
        boxes[i, 1] = math.floor(rows[0].item() / sy)
        boxes[i, 2] = min(w - 1.0, math.ceil((cols[-1].item() + 1) / sx) - 1)
        boxes[i, 3] = min(h - 1.0, math.ceil((rows[-1].item() + 1) / sy) - 1)
    return boxes


class SamSemantic(nn.Module):
    """SAM with a box prompt from the sample support and one mask token per class."""

    def __init__(self, cfg):
        """``cfg``: a resolved SAM ``ModelConfig`` (``magseg_hpc.models``)."""
        super().__init__()
        try:
            from segment_anything.modeling import (
                ImageEncoderViT,
                MaskDecoder,
                PromptEncoder,
                TwoWayTransformer,
            )
        except ImportError as e:
            raise MagsegError(
                "SAM models need the segment-anything package; pip install segment-anything"
            ) from e

        self.config = cfg.to_dict()  # a checkpoint's "model"
        size, patch, dim = cfg.image_size, cfg.patch_size, cfg.prompt_embed_dim
        grid = size // patch
        self.image_encoder = ImageEncoderViT(
            depth=cfg.encoder_depth,
            embed_dim=cfg.encoder_embed_dim,
            img_size=size,
            mlp_ratio=4,
            norm_layer=partial(nn.LayerNorm, eps=1e-6),
            num_heads=cfg.encoder_num_heads,
            patch_size=patch,
            qkv_bias=True,
            use_rel_pos=True,
            global_attn_indexes=tuple(cfg.encoder_global_attn_indexes),
            window_size=cfg.window_size,
            out_chans=dim,
        )
        self.prompt_encoder = PromptEncoder(
            embed_dim=dim,
            image_embedding_size=(grid, grid),
            input_image_size=(size, size),
            mask_in_chans=16,
        )
        self.mask_decoder = MaskDecoder(
            num_multimask_outputs=cfg.num_classes - 1,
            transformer=TwoWayTransformer(
                depth=cfg.decoder_depth,
                embedding_dim=dim,
                mlp_dim=cfg.decoder_mlp_dim,
                num_heads=cfg.decoder_num_heads,
            ),
            transformer_dim=dim,
            iou_head_depth=3,
            iou_head_hidden_dim=256,
        )
        self.prompt_encoder.requires_grad_(False)
        self.mask_decoder.iou_prediction_head.requires_grad_(False)  # unused, see module doc

    def boxes(self, x: torch.Tensor) -> torch.Tensor:
        """Box prompts (B, 4) in input pixels: the support box, jittered when training."""
        boxes = support_boxes(x)
        jitter = self.config["box_jitter"]
        if self.training and jitter > 0:
            h, w = x.shape[-2:]
            grow = torch.rand(boxes.shape, device=boxes.device) * jitter
            boxes = boxes + grow * torch.tensor([-1.0, -1.0, 1.0, 1.0], device=boxes.device)
            limit = torch.tensor([w - 1.0, h - 1.0, w - 1.0, h - 1.0], device=boxes.device)
            boxes = torch.minimum(boxes.clamp(min=0), limit)
        return boxes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != 1:
            raise ValueError(f"SamSemantic expects (B, 1, H, W), got {tuple(x.shape)}")
        size = self.config["image_size"]
        h, w = x.shape[-2:]
        scale = size / max(h, w)
        nh, nw = min(size, int(h * scale + 0.5)), min(size, int(w * scale + 0.5))
        boxes = self.boxes(x)
        boxes = boxes * torch.tensor([nw / w, nh / h, nw / w, nh / h], device=x.device)
        img = F.interpolate(x, size=(nh, nw), mode="bilinear", align_corners=False,
                            antialias=scale < 1) if (nh, nw) != (h, w) else x
        img = F.pad(img.expand(-1, 3, -1, -1), (0, size - nw, 0, size - nh))
        embeddings = self.image_encoder(img)
        sparse, dense = self.prompt_encoder(points=None, boxes=boxes.to(embeddings.dtype),
                                            masks=None)
        low = self._decode(embeddings, self.prompt_encoder.get_dense_pe(), sparse, dense)
        logits = F.interpolate(low, size=(size, size), mode="bilinear", align_corners=False)
        logits = logits[..., :nh, :nw]
        return F.interpolate(logits, size=(h, w), mode="bilinear", align_corners=False)

    def _decode(self, embeddings, image_pe, sparse, dense) -> torch.Tensor:
        """``MaskDecoder.predict_masks`` for one prompt per image (no B x B repetition);
        returns all mask tokens' logits (B, num_classes, 4 * grid, 4 * grid)."""
        dec = self.mask_decoder
        b = embeddings.shape[0]
        out_tokens = torch.cat([dec.iou_token.weight, dec.mask_tokens.weight], dim=0)
        tokens = torch.cat([out_tokens.unsqueeze(0).expand(b, -1, -1).to(sparse.dtype), sparse],
                           dim=1)
        src = embeddings + dense
        pos = image_pe.expand(b, -1, -1, -1)
        _, c, gh, gw = src.shape
        hs, src = dec.transformer(src, pos, tokens)
        mask_out = hs[:, 1:1 + dec.num_mask_tokens, :]
        up = dec.output_upscaling(src.transpose(1, 2).reshape(b, c, gh, gw))
        hyper = torch.stack([mlp(mask_out[:, i]) for i, mlp in
                             enumerate(dec.output_hypernetworks_mlps)], dim=1)
        _, uc, uh, uw = up.shape
        return (hyper @ up.reshape(b, uc, uh * uw)).reshape(b, -1, uh, uw)


# --- the official checkpoint -----------------------------------------------------------------


def _resize_pos_embed(src: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    # (1, g, g, C) -> (1, g', g', C), bicubic as in ViT fine-tuning at another resolution
    out = F.interpolate(src.permute(0, 3, 1, 2).float(), size=tuple(shape[1:3]), mode="bicubic",
                        align_corners=False)
    return out.permute(0, 2, 3, 1).to(src.dtype)


def _resize_rel_pos(src: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    # (2g - 1, head_dim) -> (2g' - 1, head_dim), linear as segment_anything.get_rel_pos does
    out = F.interpolate(src.t()[None].float(), size=shape[0], mode="linear", align_corners=False)
    return out[0].t().to(src.dtype)


def adapt_sam_state_dict(model: SamSemantic, state: dict) -> tuple[dict, dict]:
    """Map an official SAM state dict onto ``model``'s keys and shapes.

    Loaded as is: every key whose name and shape agree. Adapted: mask tokens and the IoU
    head's last layer (rows 0..min(K, K')-1 copied, the rest keep their initialisation);
    ``pos_embed`` and the global-attention ``rel_pos`` tables (interpolated) when
    ``image_size`` differs from the file's; token 0's hypernetwork output negated (background,
    see the module doc). Returns (new state dict for ``load_state_dict``, report) where the
    report lists "loaded", "adapted", "initialised" (model keys not in the file or not
    adaptable) and "ignored" (file keys the model lacks).
    """
    own = model.state_dict()
    new = dict(own)
    report = {"loaded": [], "adapted": [], "initialised": [], "ignored": []}
    last_iou = f"mask_decoder.iou_prediction_head.layers.{2}"
    for key, target in own.items():
        if key not in state:
            report["initialised"].append(key)
            continue
        src = state[key]
        if not isinstance(src, torch.Tensor):
            report["initialised"].append(key)
            continue
        if src.shape == target.shape:
            new[key] = src.to(target.dtype)
            report["loaded"].append(key)
        elif key == "mask_decoder.mask_tokens.weight" or key.startswith(last_iou):
            n = min(src.shape[0], target.shape[0])
            if src.shape[1:] != target.shape[1:]:
                report["initialised"].append(key)
                continue
            merged = target.clone()
            merged[:n] = src[:n].to(target.dtype)
            new[key] = merged
            report["adapted"].append(key)
        elif key == "image_encoder.pos_embed" and src.ndim == 4 and src.shape[3] == target.shape[3]:
            new[key] = _resize_pos_embed(src, target.shape)
            report["adapted"].append(key)
        elif key.endswith((".rel_pos_h", ".rel_pos_w")) and src.shape[1] == target.shape[1]:
            new[key] = _resize_rel_pos(src, target.shape)
            report["adapted"].append(key)
        else:
            report["initialised"].append(key)
    report["ignored"] = sorted(set(state) - set(own))
    hyper0 = "mask_decoder.output_hypernetworks_mlps.0.layers.2."
    if all(hyper0 + p in report["loaded"] for p in ("weight", "bias")):
        for p in ("weight", "bias"):
            new[hyper0 + p] = -new[hyper0 + p]
            report["loaded"].remove(hyper0 + p)
            report["adapted"].append(hyper0 + p)
    return new, report


def load_sam_weights(model: SamSemantic, path: str) -> dict:
    """Load an official SAM checkpoint (e.g. ``sam_vit_b_01ec64.pth``: a plain state dict
    with keys ``image_encoder.*``, ``prompt_encoder.*``, ``mask_decoder.*``) into ``model``,
    adapting what our class count and image size change; logs and returns the report."""

    state = read_weights(
        path,
        missing=f"SAM weights not found: {path}; download sam_vit_b_01ec64.pth (or _l/_h) from "
        "the segment-anything release page to that path, or set model.checkpoint: null",
        unreadable=f"cannot read SAM weights {path}",
        fix="it must be the official state dict file (sam_vit_b_01ec64.pth or similar)",
    )
    if isinstance(state, dict) and isinstance(state.get("model"), dict) and "format" not in state:
        state = state["model"]  # some fine-tuning repos wrap the state dict
    if not isinstance(state, dict) or not any(
        isinstance(k, str) and k.startswith("image_encoder.") for k in state
    ):
        hint = (" (that is a magseg-hpc checkpoint: give it to segment-volume, or start "
                "training from it, not as model.checkpoint)"
                if isinstance(state, dict) and "format" in state else "")
        raise MagsegError(
            f"{path} is not a SAM state dict (no image_encoder.* keys){hint}; give the official "
            "sam_vit_b_01ec64.pth"
        )
    new, report = adapt_sam_state_dict(model, state)
    enc_loaded = sum(k.startswith("image_encoder.") for k in report["loaded"] + report["adapted"])
    enc_total = sum(k.startswith("image_encoder.") for k in new)
    if enc_loaded < enc_total:
        raise MagsegError(
            f"{path} does not fit {model.config['name']}: only {enc_loaded}/{enc_total} image "
            "encoder tensors match (a ViT-L/H file for a ViT-B model?); use the file of the "
            "same variant"
        )
    model.load_state_dict(new)
    log.info("SAM weights %s: %d tensors loaded, %d adapted (%s), %d initialised (%s), "
             "%d ignored", path, len(report["loaded"]), len(report["adapted"]),
             ", ".join(report["adapted"]) or "-", len(report["initialised"]),
             ", ".join(report["initialised"]) or "-", len(report["ignored"]))
    return report
