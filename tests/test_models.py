"""DeepLabV3+ builder: shapes, output stride, decoder layout, pretrained loading, lr groups."""

import logging

import pytest
import torch
import torchvision
from torch import nn

from magseg_hpc.errors import MagsegError
from magseg_hpc.models import ModelConfig, build_model, param_groups
from magseg_hpc.models.deeplab import AtrousConv2d


@pytest.fixture(scope="module")
def r18():
    torch.manual_seed(0)
    return build_model({"backbone": "resnet18", "num_classes": 3, "in_channels": 1})


@pytest.mark.parametrize("hw", [(65, 47), (64, 64), (33, 97)])
def test_output_is_logits_at_input_size(r18, hw):
    out = r18.eval()(torch.randn(2, 1, *hw))
    assert out.shape == (2, 3, *hw)
    assert torch.isfinite(out).all()


def test_output_stride_16_and_low_level_stride_4(r18):
    low, high = r18.backbone(torch.randn(1, 1, 64, 64))
    assert high.shape[-2:] == (4, 4)
    assert low.shape[-2:] == (16, 16)


def test_decoder_layout(r18):
    aspp = r18.decoder.aspp
    rates = sorted(
        m.dilation[0]
        for m in aspp.branches.modules()
        if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)
    )
    assert rates == [6, 12, 18]
    assert isinstance(aspp.pool[0], nn.AdaptiveAvgPool2d)
    assert aspp.project[0].in_channels == 5 * 256 and aspp.project[0].out_channels == 256
    proj = r18.decoder.low_proj[0]
    assert proj.out_channels == 48 and proj.bias is not None and proj.kernel_size == (1, 1)
    convs = [m for m in r18.decoder.classifier.modules() if isinstance(m, nn.Conv2d)]
    assert [c.kernel_size for c in convs] == [(3, 3), (3, 3), (1, 1)]
    assert convs[-1].out_channels == 3
    assert not any(isinstance(m, nn.Dropout | nn.Dropout2d) for m in r18.modules())


def test_layer4_dilated_multigrid(r18):
    dil = [b.conv1.dilation[0] for b in r18.backbone.layer4]
    assert dil == [2, 4]
    assert all(b.conv1.stride == (1, 1) for b in r18.backbone.layer4)
    assert r18.config["deep_stem"] is False


def test_resnet101_deep_stem_forward_backward():
    model = build_model({"backbone": "resnet101", "num_classes": 3})
    assert model.config["deep_stem"] is True
    assert [b.conv2.dilation[0] for b in model.backbone.layer4] == [2, 4, 8]
    assert model.backbone.layer1[0].conv1.in_channels == 128
    assert model.backbone.maxpool.ceil_mode
    model.train()
    # batch 2: the ASPP image-pooling BN sees one value per channel per image
    x = torch.randn(2, 1, 64, 64)
    out = model(x)
    assert out.shape == (2, 3, 64, 64)
    out.logsumexp(1).mean().backward()
    assert model.backbone.conv1.weight.grad is not None
    assert model.decoder.classifier[-1].weight.grad.abs().sum() > 0


@pytest.mark.parametrize("dilation", [2, 4, 6, 18])
@pytest.mark.parametrize("hw", [(4, 4), (5, 7), (13, 9), (38, 38)])
def test_atrous_conv_on_subgrids_is_the_dilated_conv(dilation, hw):
    """Training runs dilated convolutions on the d x d sub-grids (or, on a map no larger than
    d, as the kernel's centre): the output and both gradients must be the dilated kernel's."""
    torch.manual_seed(0)
    conv = AtrousConv2d(16, 8, dilation, bias=True)
    x = torch.randn(3, 16, *hw, dtype=torch.float64, requires_grad=True)
    conv = conv.double()
    grad_out = torch.randn(3, 8, *hw, dtype=torch.float64)
    results = []
    for forward in (conv.forward, lambda t: nn.Conv2d.forward(conv, t)):
        y = forward(x)
        y.backward(grad_out)
        results.append((y.detach(), x.grad.clone(), conv.weight.grad.clone(),
                        conv.bias.grad.clone()))
        x.grad, conv.weight.grad, conv.bias.grad = None, None, None
    for ours, dilated in zip(*results):
        torch.testing.assert_close(ours, dilated)


def test_model_trains_the_same_with_subgrid_atrous():
    """The whole network's loss and gradients with the sub-grid path equal oneDNN's dilated
    kernels (what the model computed before AtrousConv2d)."""
    torch.manual_seed(0)
    model = build_model({"backbone": "resnet18", "num_classes": 3, "in_channels": 5,
                         "decoder_channels": 64}).double().train()
    atrous = [m for m in model.modules() if isinstance(m, AtrousConv2d)]
    assert len(atrous) == 4 + 3  # layer4's four 3x3 convs and the ASPP's three rates
    x = torch.randn(4, 5, 64, 64, dtype=torch.float64)
    grads = []
    for subgrid in (True, False):
        for m in atrous:
            m.forward = m.forward if subgrid else (lambda t, m=m: nn.Conv2d.forward(m, t))
        model.zero_grad()
        model(x).logsumexp(1).mean().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for ours, dilated in zip(*grads):
        torch.testing.assert_close(ours, dilated)


def _save_torchvision_r18(path):
    torch.manual_seed(1)
    tv = torchvision.models.resnet18(weights=None)
    torch.save(tv.state_dict(), path)
    return tv


def test_pretrained_local_file_single_channel(tmp_path, caplog):
    tv = _save_torchvision_r18(tmp_path / "r18.pth")
    with caplog.at_level(logging.INFO, logger="magseg_hpc.models.deeplab"):
        model = build_model(
            {"backbone": "resnet18", "num_classes": 3, "pretrained": str(tmp_path / "r18.pth")}
        )
    assert "loaded" in caplog.text
    w = model.backbone.conv1.weight
    assert w.shape == (64, 1, 7, 7)
    torch.testing.assert_close(w, tv.conv1.weight.sum(1, keepdim=True))
    torch.testing.assert_close(model.backbone.layer3[1].conv2.weight, tv.layer3[1].conv2.weight)
    torch.testing.assert_close(model.backbone.bn1.running_var, tv.bn1.running_var)
    # summed RGB weights on grey == RGB net on the replicated grey image (stem conv)
    g = torch.randn(1, 1, 32, 32)
    torch.testing.assert_close(
        model.backbone.conv1(g), tv.conv1(g.repeat(1, 3, 1, 1)), rtol=1e-4, atol=1e-4
    )


def test_pretrained_into_deep_stem_loads_matching_parts(tmp_path, caplog):
    tv = _save_torchvision_r18(tmp_path / "r18.pth")
    with caplog.at_level(logging.INFO, logger="magseg_hpc.models.deeplab"):
        model = build_model(
            {"backbone": "resnet18", "deep_stem": True, "pretrained": str(tmp_path / "r18.pth")}
        )
    assert "conv1.weight" in caplog.text  # named as not loaded
    assert model.backbone.conv1.weight.shape == (64, 1, 3, 3)
    torch.testing.assert_close(model.backbone.layer2[0].conv1.weight, tv.layer2[0].conv1.weight)


def test_pretrained_missing_or_wrong_file(tmp_path):
    with pytest.raises(MagsegError, match="not found"):
        build_model({"backbone": "resnet18", "pretrained": str(tmp_path / "nope.pth")})
    torch.save({"a": torch.zeros(3)}, tmp_path / "other.pth")
    with pytest.raises(MagsegError, match="match"):
        build_model({"backbone": "resnet18", "pretrained": str(tmp_path / "other.pth")})


def test_width_scales_every_stage_and_refuses_imagenet_weights():
    """model.width: the first stage's channels, the later ones 2x, 4x and 8x (resnet10: one
    block a stage); the logits keep the input's size; ImageNet ResNets are width 64 only."""
    model = build_model({"backbone": "resnet10", "width": 16, "decoder_channels": 32,
                         "norm": "group"})
    stages = [model.backbone.layer1, model.backbone.layer2, model.backbone.layer3,
              model.backbone.layer4]
    assert [len(s) for s in stages] == [1, 1, 1, 1]
    assert [s[0].conv1.out_channels for s in stages] == [16, 32, 64, 128]
    assert model.decoder.aspp.branches[0][0].in_channels == 128
    assert model(torch.randn(2, 1, 40, 24)).shape == (2, 3, 40, 24)
    full = sum(p.numel() for p in build_model({"backbone": "resnet10"}).parameters())
    assert sum(p.numel() for p in model.parameters()) < full / 10
    with pytest.raises(MagsegError, match="model.width 16 cannot start from ImageNet weights"):
        ModelConfig.from_dict({"backbone": "resnet18", "width": 16, "pretrained": "w.pth"})
    with pytest.raises(MagsegError, match="model.width"):
        ModelConfig.from_dict({"width": 0})


def test_bad_config_names_valid_choices():
    with pytest.raises(MagsegError, match="resnet101"):
        ModelConfig.from_dict({"backbone": "resnet34"})
    with pytest.raises(MagsegError, match="valid keys"):
        ModelConfig.from_dict({"dropout": 0.1})
    assert ModelConfig.from_dict({"pretrained": "none"}).pretrained is None
    with pytest.raises(MagsegError, match="model.image_size=64 does not apply to deeplabv3plus"):
        ModelConfig.from_dict({"image_size": 64})


def test_norm_auto_is_resolved_in_one_step():
    """auto is a valid setting that the training volume decides (ModelConfig.resolved);
    a model is never built from it."""
    auto = ModelConfig.from_dict({"backbone": "resnet18", "norm": "auto"})
    assert auto.norm == "auto" and auto.section()["norm"] == "auto"
    assert auto.resolved(masked=True).norm == "group"
    assert auto.resolved(masked=False).norm == "batch"
    pretrained = ModelConfig.from_dict({"norm": "auto", "pretrained": "w.pth"})
    assert pretrained.resolved(masked=True).norm == "batch"  # ImageNet weights keep BatchNorm
    assert auto.resolved(masked=True).to_dict()["deep_stem"] is False  # resnet18's stem
    with pytest.raises(MagsegError, match="model.norm auto is decided by the training volume"):
        build_model(auto)


def test_param_groups_head_lr(r18):
    groups = param_groups(r18, 1e-3, 10.0)
    assert [g["lr"] for g in groups] == pytest.approx([1e-3, 1e-2])
    n_back = sum(p.numel() for p in r18.backbone.parameters())
    assert sum(p.numel() for p in groups[0]["params"]) == n_back
    assert sum(p.numel() for g in groups for p in g["params"]) == sum(
        p.numel() for p in r18.parameters()
    )
    opt = torch.optim.SGD(param_groups(r18, 0.01, 1.0), lr=0.01, momentum=0.9)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.01, 0.01])
