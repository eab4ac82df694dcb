"""DeepLabV3+ on torchvision-compatible ResNets, as in AugSeg (spec section 1).

Encoder: ResNet-18/50/101 at output stride 16. layer4 is dilated instead of strided and its
blocks get multi-grid dilations (2, 4, 8) (two blocks on ResNet-18: (2, 4)). With ``deep_stem``
the stem is the ResNet-C one of CPS/U2PL/AugSeg: three 3x3 convs (in->64 stride 2, 64->64,
64->128) with BN+ReLU, then a 3x3/2 max-pool with ``ceil_mode=True``; layer1 takes 128
channels. Without it the stem is torchvision's (7x7/2 conv, 3x3/2 max-pool).

Decoder: ASPP on layer4 with five 256-channel branches (image pooling, 1x1, 3x3 at rates
6/12/18, all BN+ReLU), a 1x1 conv of the 1280-channel concatenation to 256, upsampled to
stride 4 and concatenated with a 48-channel projection of layer1 (1x1 conv with bias, BN,
ReLU); classifier 3x3(256) -> 3x3(256) -> 1x1(C). No dropout, no auxiliary head. Logits are
upsampled bilinearly (``align_corners=True``) to the input size.

Parameter and buffer names follow torchvision (``conv1``, ``bn1``, ``layerN.i.convK``,
``downsample.0/1``) so an ImageNet ResNet state_dict loads by name. Pretrained weights come
only from a local file (``pretrained``); nothing is downloaded.

Single-channel input with RGB weights: the first conv's weights are summed over the RGB axis,
which is exactly what the RGB network computes on a channel-replicated grey image (the
study replicated grey to RGB on disk). Any other channel count gets the RGB mean repeated,
scaled by 3/in_channels so activations keep their magnitude.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from magseg_hpc.errors import MagsegError
from magseg_hpc.models.weights import read_weights

log = logging.getLogger(__name__)

BACKBONES = {
    # name: (block kind, blocks per layer)
    # resnet10: one block a layer, no ImageNet weights of its own (random init): the smallest
    # and fastest on a CPU (with model.width 16, the tests' model)
    "resnet10": ("basic", (1, 1, 1, 1)),
    "resnet18": ("basic", (2, 2, 2, 2)),
    "resnet50": ("bottleneck", (3, 4, 6, 3)),
    "resnet101": ("bottleneck", (3, 4, 23, 3)),
}
MULTI_GRID = (1, 2, 4)  # times layer4's base dilation 2 -> (2, 4, 8)
ASPP_RATES = (6, 12, 18)  # output stride 16
LOW_LEVEL_CHANNELS = 48


class AtrousConv2d(nn.Conv2d):
    """A dilated 3x3 convolution (stride 1, padding = dilation) whose training forward on the
    CPU runs undilated on the d x d interleaved sub-grids of its input (space-to-batch, as in
    the DeepLab papers): the taps of a dilated kernel at one output pixel all fall in that
    pixel's sub-grid, so the result is the same. Why: oneDNN's weight gradient of a dilated
    convolution is several times slower than an undilated one in bf16 on the small maps of
    training crops (layer4 and ASPP: 4 x 4 at crop 64; benchmarks/README.md, bf16 section).
    Inference and no-grad forwards keep the dilated kernel (fast there)."""

    def __init__(self, cin: int, cout: int, dilation: int, bias: bool = False):
        super().__init__(cin, cout, 3, padding=dilation, dilation=dilation, bias=bias)

    def forward(self, x):
        d = self.dilation[0]
        if x.device.type != "cpu" or not (torch.is_grad_enabled() and self.weight.requires_grad):
            return super().forward(x)
        n, c, h, w = x.shape
        if h <= d and w <= d:  # every tap but the centre reads the zero padding
            return F.conv2d(x, self.weight[:, :, 1:2, 1:2], self.bias)
        hs, ws = -(-h // d), -(-w // d)  # sub-grid size; zeros past the edge are the padding
        x = F.pad(x, (0, ws * d - w, 0, hs * d - h))
        x = x.view(n, c, hs, d, ws, d).permute(0, 3, 5, 1, 2, 4).reshape(n * d * d, c, hs, ws)
        y = F.conv2d(x, self.weight, self.bias, padding=1)
        y = y.view(n, d, d, -1, hs, ws).permute(0, 3, 4, 1, 5, 2).reshape(n, -1, hs * d, ws * d)
        return y[:, :, :h, :w]


def _conv3x3(cin: int, cout: int, stride: int = 1, dilation: int = 1,
             bias: bool = False) -> nn.Conv2d:
    if dilation > 1 and stride == 1:
        return AtrousConv2d(cin, cout, dilation, bias=bias)
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=dilation, dilation=dilation, bias=bias)


def norm_layer(kind: str, channels: int) -> nn.Module:
    """BatchNorm (the study's) or GroupNorm with 16 channels a group (at most 32 groups).

    GroupNorm computes the same thing in training and in evaluation and has no running
    statistics, so an EMA teacher is exactly an average of weights.
    """
    if kind == "group":
        return nn.GroupNorm(min(32, max(1, channels // 16)), channels)
    return nn.BatchNorm2d(channels)


def _init_conv_bn(module: nn.Module) -> None:
    """torchvision's ResNet init: Kaiming fan-out convolutions, unit-scale normalisation."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class BasicBlock(nn.Module):
    """torchvision's BasicBlock, but dilation > 1 is allowed (needed for OS16 on ResNet-18)."""

    expansion = 1

    def __init__(self, inplanes, planes, stride, dilation, downsample, norm):
        super().__init__()
        self.conv1 = _conv3x3(inplanes, planes, stride, dilation)
        self.bn1 = norm_layer(norm, planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(planes, planes, 1, dilation)
        self.bn2 = norm_layer(norm, planes)
        self.downsample = downsample

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """ResNet v1.5 bottleneck (stride on the 3x3 conv), torchvision parameter names."""

    expansion = 4

    def __init__(self, inplanes, planes, stride, dilation, downsample, norm):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = norm_layer(norm, planes)
        self.conv2 = _conv3x3(planes, planes, stride, dilation)
        self.bn2 = norm_layer(norm, planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = norm_layer(norm, planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNetBackbone(nn.Module):
    """ResNet encoder at output stride 16; ``forward`` returns (layer1, layer4) features."""

    def __init__(self, backbone: str, in_channels: int, deep_stem: bool,
                 zero_init_residual: bool, norm: str, width: int = 64):
        super().__init__()
        kind, layers = BACKBONES[backbone]
        self.norm = norm
        block = BasicBlock if kind == "basic" else Bottleneck
        self.deep_stem = deep_stem
        if deep_stem:
            self.conv1 = _conv3x3(in_channels, width, stride=2)
            self.bn1 = norm_layer(norm, width)
            self.conv2 = _conv3x3(width, width)
            self.bn2 = norm_layer(norm, width)
            self.conv3 = _conv3x3(width, 2 * width)
            self.bn3 = norm_layer(norm, 2 * width)
            self.maxpool = nn.MaxPool2d(3, stride=2, padding=1, ceil_mode=True)
            self.inplanes = 2 * width
        else:
            self.conv1 = nn.Conv2d(in_channels, width, 7, stride=2, padding=3, bias=False)
            self.bn1 = norm_layer(norm, width)
            self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
            self.inplanes = width
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._make_layer(block, width, layers[0], stride=1, dilations=None)
        self.layer2 = self._make_layer(block, 2 * width, layers[1], stride=2, dilations=None)
        self.layer3 = self._make_layer(block, 4 * width, layers[2], stride=2, dilations=None)
        # replace_stride_with_dilation=[F, F, T] with multi-grid on layer4's blocks.
        grid = MULTI_GRID[: layers[3]]
        self.layer4 = self._make_layer(
            block, 8 * width, layers[3], stride=1, dilations=tuple(2 * g for g in grid)
        )
        self.low_level_channels = width * block.expansion
        self.high_level_channels = 8 * width * block.expansion

        _init_conv_bn(self)
        if zero_init_residual:  # as AugSeg; pretrained weights overwrite it
            for m in self.modules():
                if isinstance(m, Bottleneck):
                    nn.init.zeros_(m.bn3.weight)
                elif isinstance(m, BasicBlock):
                    nn.init.zeros_(m.bn2.weight)

    def _make_layer(self, block, planes, blocks, stride, dilations):
        dilations = dilations or (1,) * blocks
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * block.expansion, 1, stride=stride, bias=False),
                norm_layer(self.norm, planes * block.expansion),
            )
        layers = [block(self.inplanes, planes, stride, dilations[0], downsample, self.norm)]
        self.inplanes = planes * block.expansion
        for i in range(1, blocks):
            layers.append(block(self.inplanes, planes, 1, dilations[i], None, self.norm))
        return nn.Sequential(*layers)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        if self.deep_stem:
            x = self.relu(self.bn2(self.conv2(x)))
            x = self.relu(self.bn3(self.conv3(x)))
        x = self.maxpool(x)
        low = self.layer1(x)
        high = self.layer4(self.layer3(self.layer2(low)))
        return low, high


def _conv_bn_relu(cin: int, cout: int, k: int, *, norm: str, dilation: int = 1,
                  bias: bool = False):
    return nn.Sequential(
        _conv3x3(cin, cout, dilation=dilation, bias=bias) if k == 3
        else nn.Conv2d(cin, cout, 1, bias=bias),
        norm_layer(norm, cout),
        nn.ReLU(inplace=True),
    )


class ASPP(nn.Module):
    """Image pooling + 1x1 + three atrous 3x3 branches, 256 channels each, then 1x1 to 256."""

    def __init__(self, in_channels: int, channels: int, norm: str, rates=ASPP_RATES):
        super().__init__()
        self.rates = tuple(rates)
        self.pool = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), *_conv_bn_relu(in_channels, channels, 1, norm=norm)
        )
        self.branches = nn.ModuleList(
            [_conv_bn_relu(in_channels, channels, 1, norm=norm)]
            + [_conv_bn_relu(in_channels, channels, 3, dilation=r, norm=norm) for r in self.rates]
        )
        self.project = _conv_bn_relu(channels * (2 + len(self.rates)), channels, 1, norm=norm)

    def forward(self, x):
        size = x.shape[-2:]
        pooled = F.interpolate(self.pool(x), size=size, mode="bilinear", align_corners=True)
        return self.project(torch.cat([pooled] + [b(x) for b in self.branches], dim=1))


class DeepLabV3PlusHead(nn.Module):
    def __init__(self, low_channels: int, high_channels: int, num_classes: int, channels: int,
                 norm: str):
        super().__init__()
        self.aspp = ASPP(high_channels, channels, norm)
        self.low_proj = _conv_bn_relu(low_channels, LOW_LEVEL_CHANNELS, 1, bias=True, norm=norm)
        self.classifier = nn.Sequential(
            _conv_bn_relu(channels + LOW_LEVEL_CHANNELS, channels, 3, norm=norm),
            _conv_bn_relu(channels, channels, 3, norm=norm),
            nn.Conv2d(channels, num_classes, 1),
        )
        _init_conv_bn(self)
        # Kaiming fan-out on a 3-channel output gives logits with std ~8: from random init
        # every pixel would pass the 0.95 confidence threshold and pseudo-labels collapse to
        # one class. PyTorch's default (fan-in) init keeps the first predictions soft.
        self.classifier[-1].reset_parameters()

    def forward(self, low, high):
        high = self.aspp(high)
        high = F.interpolate(high, size=low.shape[-2:], mode="bilinear", align_corners=True)
        return self.classifier(torch.cat([high, self.low_proj(low)], dim=1))


class DeepLabV3Plus(nn.Module):
    """(B, in_channels x context_slices, H, W) -> logits (B, num_classes, H, W), for a
    resolved ``ModelConfig`` (``magseg_hpc.models``); ``config`` is its dict (a checkpoint's
    "model")."""

    def __init__(self, cfg):
        super().__init__()
        self.config = cfg.to_dict()
        self.backbone = ResNetBackbone(cfg.backbone, cfg.in_channels * cfg.context_slices,
                                       cfg.deep_stem, cfg.zero_init_residual, cfg.norm,
                                       cfg.width)
        self.decoder = DeepLabV3PlusHead(self.backbone.low_level_channels,
                                         self.backbone.high_level_channels, cfg.num_classes,
                                         cfg.decoder_channels, cfg.norm)

    def forward(self, x):
        low, high = self.backbone(x)
        logits = self.decoder(low, high)
        return F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=True)


def _adapt_first_conv(weight: torch.Tensor, in_channels: int) -> torch.Tensor:
    if weight.shape[1] == in_channels:
        return weight
    if in_channels == 1:
        # conv(w, [g, g, g]) == conv(sum_c w_c, g): exact for a replicated grey image.
        return weight.sum(dim=1, keepdim=True)
    mean = weight.mean(dim=1, keepdim=True)
    return mean.repeat(1, in_channels, 1, 1) * (weight.shape[1] / in_channels)


def load_pretrained_backbone(backbone: ResNetBackbone, path: str | Path) -> dict:
    """Load a local ImageNet ResNet state_dict into ``backbone`` where names and shapes match.

    Accepts a plain torchvision state_dict or one wrapped in "state_dict"/"model", with or
    without a "module." prefix. Returns {"loaded": [...], "skipped": [...], "missing": [...]}
    and logs a one-line summary (with a deep stem, torchvision's 7x7 conv1 and the first
    layer1 block's input convs do not match and stay randomly initialised).
    """
    state = read_weights(
        path,
        missing=f"pretrained weights not found: {path}; give model.pretrained the path of a "
        "local torchvision ImageNet ResNet state_dict (.pth), or null for random init",
        unreadable=f"cannot read pretrained weights {path}",
        fix="it must be a torchvision ResNet state_dict saved with torch.save",
    )
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise MagsegError(
            f"{path} is not a state_dict of tensors; give a torchvision ResNet state_dict"
        )
    state = {k.removeprefix("module.").removeprefix("backbone."): v for k, v in state.items()}
    own = backbone.state_dict()
    in_channels = own["conv1.weight"].shape[1]
    if "conv1.weight" in state:
        state["conv1.weight"] = _adapt_first_conv(state["conv1.weight"], in_channels)
    matched = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    skipped = sorted(k for k in state if k not in matched)
    missing = sorted(k for k in own if k not in matched)
    log.info(
        "pretrained %s: loaded %d of %d backbone tensors; skipped %d from the file "
        "(no match: %s); left at init: %s",
        path,
        len(matched),
        len(own),
        len(skipped),
        ", ".join(skipped[:6]) or "none",
        ", ".join(missing[:6]) + (" ..." if len(missing) > 6 else "") if missing else "none",
    )
    if len(matched) < len(own) // 2:
        raise MagsegError(
            f"only {len(matched)} of {len(own)} backbone tensors match {path}; is it an ImageNet "
            "ResNet of the same depth as model.backbone?"
        )
    backbone.load_state_dict(matched, strict=False)
    return {"loaded": sorted(matched), "skipped": skipped, "missing": missing}
