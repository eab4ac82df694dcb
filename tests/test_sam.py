"""SAM as a semantic model: shapes, frozen parts, the box prompt, the official weight file
format, our checkpoint format, learning, and training + segment-volume through the CLI.

A tiny SAM (``sam_tiny``: 2 encoder blocks of width 32, image_size 64, random init) runs the
same code path as ViT-B; the official file format is a state dict the test writes from a tiny
``segment_anything`` ``Sam`` built the way ``build_sam`` builds the real one.
"""

from __future__ import annotations

import json
import logging
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from torch import nn

from magseg_hpc.classes import ClassTable
from magseg_hpc.errors import MagsegError
from magseg_hpc.models import ModelConfig, build_model, param_groups
from magseg_hpc.models.checkpoint import load_checkpoint, load_inference_model, save_checkpoint
from magseg_hpc.models.sam import SAM_VARIANTS, support_boxes
from magseg_hpc.train.losses import dice_loss, supervised_loss

TINY = {"name": "sam_tiny", "num_classes": 3}
HYPER0 = "mask_decoder.output_hypernetworks_mlps.0.layers.2.weight"


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return build_model(TINY)


def official_tiny_sam(image_size: int = 64) -> nn.Module:
    """A ``segment_anything.modeling.Sam`` with sam_tiny's sizes and the official head
    (num_multimask_outputs=3, i.e. 4 mask tokens), as ``_build_sam`` assembles it."""
    from segment_anything.modeling import (
        ImageEncoderViT,
        MaskDecoder,
        PromptEncoder,
        Sam,
        TwoWayTransformer,
    )

    p = SAM_VARIANTS["sam_tiny"]
    grid = image_size // p["patch_size"]
    torch.manual_seed(123)
    return Sam(
        image_encoder=ImageEncoderViT(
            depth=p["encoder_depth"], embed_dim=p["encoder_embed_dim"], img_size=image_size,
            mlp_ratio=4, norm_layer=partial(nn.LayerNorm, eps=1e-6),
            num_heads=p["encoder_num_heads"], patch_size=p["patch_size"], qkv_bias=True,
            use_rel_pos=True, global_attn_indexes=p["encoder_global_attn_indexes"],
            window_size=p["window_size"], out_chans=p["prompt_embed_dim"]),
        prompt_encoder=PromptEncoder(
            embed_dim=p["prompt_embed_dim"], image_embedding_size=(grid, grid),
            input_image_size=(image_size, image_size), mask_in_chans=16),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(depth=p["decoder_depth"],
                                          embedding_dim=p["prompt_embed_dim"],
                                          mlp_dim=p["decoder_mlp_dim"],
                                          num_heads=p["decoder_num_heads"]),
            transformer_dim=p["prompt_embed_dim"], iou_head_depth=3, iou_head_hidden_dim=256),
        pixel_mean=[123.675, 116.28, 103.53], pixel_std=[58.395, 57.12, 57.375],
    )


@pytest.fixture(scope="module")
def official_file(tmp_path_factory) -> tuple[Path, dict]:
    sam = official_tiny_sam()
    # give the random-init rel_pos tables (zero by default) content, so copying is checkable
    state = {k: (torch.randn_like(v) if "rel_pos" in k else v) for k, v in
             sam.state_dict().items()}
    path = tmp_path_factory.mktemp("sam") / "sam_tiny_official.pth"
    torch.save(state, path)
    return path, state


@pytest.mark.parametrize("hw", [(37, 53), (70, 20)])
def test_forward_logits_at_input_size(tiny, hw):
    out = tiny.eval()(torch.randn(2, 1, *hw))
    assert out.shape == (2, 3, *hw)
    assert torch.isfinite(out).all()


def test_prompt_encoder_frozen_encoder_and_decoder_train(tiny):
    tiny.train()
    assert not any(p.requires_grad for p in tiny.prompt_encoder.parameters())
    assert all(p.requires_grad for p in tiny.image_encoder.parameters())
    head = dict(tiny.mask_decoder.named_parameters())
    assert all(p.requires_grad for n, p in head.items() if not n.startswith("iou_prediction"))
    tiny.zero_grad()
    tiny(torch.randn(1, 1, 40, 40)).square().mean().backward()
    # every trainable parameter gets a gradient (DDP without find_unused_parameters)
    assert [n for n, p in tiny.named_parameters() if p.requires_grad and p.grad is None] == []
    groups = param_groups(tiny, 1e-4, 1.0)
    n_enc = sum(1 for _ in tiny.image_encoder.parameters())
    assert [g["name"] for g in groups] == ["backbone", "head"] and len(groups[0]["params"]) == n_enc
    assert not any(p is q for g in groups for p in g["params"]
                   for q in tiny.prompt_encoder.parameters())


def test_box_from_the_sample_support(tiny):
    x = torch.zeros(3, 1, 37, 53)
    x[0, 0, 10:20, 5:40] = 2.0  # a bright sample on a flat background
    x[1, 0, 10:20, 5:40] = torch.tensor([-1.0, 1.0]).repeat(175)[:350].reshape(10, 35)  # signed
    boxes = support_boxes(x)  # x[2] is flat: the whole image
    for i in (0, 1):
        assert (boxes[i] - torch.tensor([5.0, 10.0, 39.0, 19.0])).abs().max() <= 1
    assert boxes[2].tolist() == [0.0, 0.0, 52.0, 36.0]
    tiny.eval()
    assert torch.equal(tiny.boxes(x), boxes)  # no jitter at inference
    tiny.train()
    torch.manual_seed(0)
    jittered = tiny.boxes(x[:1].expand(64, -1, -1, -1))
    grow = (jittered - boxes[0]) * torch.tensor([-1.0, -1.0, 1.0, 1.0])
    assert (grow >= 0).all() and grow.max() > 10  # outward only, up to box_jitter = 20 px
    assert (jittered[:, 0] >= 0).all() and (jittered[:, 2] <= 52).all()


def test_official_checkpoint_loads_by_key(official_file, caplog):
    path, state = official_file
    with caplog.at_level(logging.INFO, logger="magseg_hpc.models.sam"):
        model = build_model({**TINY, "checkpoint": str(path)})
    assert "tensors loaded" in caplog.text
    own = model.state_dict()
    enc = [k for k in state if k.startswith("image_encoder.")]
    assert enc and all(torch.equal(own[k], state[k]) for k in enc)
    assert torch.equal(own["prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"],
                       state["prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"])
    tokens = "mask_decoder.mask_tokens.weight"
    assert own[tokens].shape[0] == 3 and torch.equal(own[tokens], state[tokens][:3])
    hyper1 = HYPER0.replace(".0.", ".1.")
    assert torch.equal(own[hyper1], state[hyper1])
    assert torch.equal(own[HYPER0], -state[HYPER0])  # background = not the boxed object

    five = build_model({**TINY, "num_classes": 5, "checkpoint": str(path)})
    own5 = five.state_dict()
    assert torch.equal(own5[tokens][:4], state[tokens])
    assert five.eval()(torch.randn(1, 1, 30, 30)).shape == (1, 5, 30, 30)

    # another image size: position tables interpolated, everything else as is
    small = build_model({**TINY, "image_size": 32, "checkpoint": str(path)})
    assert small.state_dict()["image_encoder.pos_embed"].shape[1:3] == (4, 4)
    assert torch.equal(small.state_dict()[enc[-1]], state[enc[-1]])


def test_wrong_weight_files_are_refused(official_file, tmp_path):
    path, _ = official_file
    with pytest.raises(MagsegError, match="SAM weights not found"):
        build_model({**TINY, "checkpoint": str(tmp_path / "none.pth")})
    torch.save({"fc.weight": torch.zeros(2)}, tmp_path / "resnet.pth")
    with pytest.raises(MagsegError, match="not a SAM state dict"):
        build_model({**TINY, "checkpoint": str(tmp_path / "resnet.pth")})
    with pytest.raises(MagsegError, match="does not fit sam_tiny"):
        build_model({**TINY, "encoder_embed_dim": 16, "checkpoint": str(path)})


def test_config_resolution_and_errors():
    cfg = ModelConfig.from_dict({"name": "sam_vit_b", "checkpoint": "w.pth",
                                 "backbone": "resnet101", "deep_stem": None,
                                 "output_stride": 16}).resolved().to_dict()
    assert cfg["pretrained"] == "w.pth" and cfg["image_size"] == 1024
    assert cfg["encoder_depth"] == 12 and "backbone" not in cfg
    # idempotent (checkpoints store the resolved dict)
    assert ModelConfig.from_dict(cfg).resolved().to_dict() == cfg
    with pytest.raises(MagsegError, match="does not apply to sam_vit_l"):
        ModelConfig.from_dict({"name": "sam_vit_l", "backbone": "resnet18"})
    with pytest.raises(MagsegError, match="valid keys: .*box_jitter"):
        ModelConfig.from_dict({"name": "sam_vit_h", "dropout": 0.1})
    with pytest.raises(MagsegError, match="not one of .*sam_vit_b"):
        ModelConfig.from_dict({"name": "sam_vit_x"})
    with pytest.raises(MagsegError, match="multiple of model.patch_size"):
        ModelConfig.from_dict({"name": "sam_tiny", "image_size": 60})


def test_our_checkpoint_round_trip(tiny, tmp_path):
    # the official file named in the config is not needed to rebuild the trained model
    config = {**tiny.config, "pretrained": str(tmp_path / "gone" / "sam_vit_b_01ec64.pth")}
    state = tiny.state_dict()
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, {"model": config, "class_table": ClassTable.default().to_dict(),
                           "normalization": {"low": 0.0, "high": 1.0, "mean": 0.5, "std": 0.2},
                           "student": state, "teacher": state})
    model, ckpt = load_inference_model(path)
    assert not model.training and ckpt["model"]["name"] == "sam_tiny"
    x = torch.randn(2, 1, 29, 41)
    with torch.no_grad():
        assert torch.equal(model(x), tiny.eval()(x))
    load_checkpoint(path, expect_model=TINY)
    with pytest.raises(MagsegError, match="another architecture .*image_size"):
        load_checkpoint(path, expect_model={**TINY, "image_size": 128})
    with pytest.raises(MagsegError, match="another architecture .*name"):
        load_checkpoint(path, expect_model={"backbone": "resnet18"})


def test_dice_loss():
    target = torch.tensor([[[0, 1], [2, 255]]])
    perfect = torch.nn.functional.one_hot(torch.tensor([[[0, 1], [2, 0]]]), 3).permute(0, 3, 1, 2)
    assert dice_loss(perfect.float() * 50, target) < 1e-3
    assert dice_loss(-perfect.float() * 50, target) > 0.5
    logits = torch.randn(1, 3, 2, 2)
    ce = torch.nn.functional.cross_entropy(logits, target, ignore_index=255)
    assert supervised_loss(logits, target, 0.0) == ce
    assert supervised_loss(logits, target, 1.0) == pytest.approx(ce + dice_loss(logits, target))


def test_a_few_steps_reduce_the_loss():
    torch.manual_seed(0)
    model = build_model({**TINY, "box_jitter": 2})
    yy, xx = torch.meshgrid(torch.arange(32), torch.arange(32), indexing="ij")
    target = torch.zeros(4, 32, 32, dtype=torch.long)
    target[:, 6:26, 6:26] = 1 + ((xx[6:26, 6:26] // 5) % 2)  # stripes in a square sample
    x = torch.where(target == 0, 0.0, torch.where(target == 1, 0.3, 1.0))[:, None]
    x = x + 0.05 * torch.randn_like(x)
    opt = torch.optim.AdamW(param_groups(model, 5e-3, 1.0), lr=5e-3, weight_decay=0.01)
    model.train()
    losses = []
    for _ in range(12):
        loss = supervised_loss(model(x), target, dice_weight=1.0)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert np.mean(losses[-3:]) < 0.8 * np.mean(losses[:3]), losses


def test_train_and_segment_volume_through_the_cli(tmp_path, capsys):
    from magseg_hpc.cli import main
    from magseg_hpc.data.phantom import make_phantom, write_phantom
    from magseg_hpc.volume.store import open_labels

    volume = tmp_path / "phantom.zarr"
    write_phantom(volume, make_phantom((10, 24, 28), seed=0, n_angles=12))
    config = tmp_path / "sam.yaml"
    config.write_text(yaml.safe_dump({
        "name": "tiny_sam", "seed": 0, "model": {"name": "sam_tiny", "box_jitter": 2},
        "data": {"volume": str(volume), "n_labeled": 2, "n_val": 2},
        "train": {"method": "supervised", "batch_size": 2, "crop_size": 24, "epochs": 1,
                  "lr": 1e-3, "checkpoint_every": 2, "eval_every": 2, "log_every": 1,
                  "device": "cpu", "threads": 1},
    }))
    run = tmp_path / "run"
    rc = main(["train", "--config", str(config), "--output-dir", str(run), "train.max_iters=2"])
    assert rc == 0
    assert "training stopped at iteration 2" in capsys.readouterr().out
    summary = json.loads((run / "summary.json").read_text())
    assert summary["iterations"] == 2
    ckpt = load_checkpoint(run / "best.pt")
    assert ckpt["model"]["name"] == "sam_tiny" and ckpt["model"]["box_jitter"] == 2.0
    # train.optimizer auto -> AdamW for SAM (Adam moments in the saved optimizer state)
    state = load_checkpoint(run / "checkpoint.pt")["train_state"]["optimizer"]["state"]
    assert state and all("exp_avg" in s for s in state.values())

    out = tmp_path / "labels.zarr"
    rc = main(["segment-volume", str(volume), str(out), "--model", str(run / "best.pt"),
               "--normalization", "checkpoint",  # what the reference below applies
               "--in-process", "--dashboard-address", ":0", "--batch-size", "4"])
    assert rc == 0, capsys.readouterr().err
    labels, table = open_labels(out)
    assert labels.shape == (10, 24, 28) and table == ClassTable.default()
    # the pipeline's labels are the argmax of the model applied slice by slice
    from magseg_hpc.data.normalize import apply_normalization

    model, _ = load_inference_model(run / "best.pt")
    image = make_phantom((10, 24, 28), seed=0, n_angles=12).image
    with torch.no_grad():
        x = torch.from_numpy(apply_normalization(image[3:5], ckpt["normalization"]))[:, None]
        expected = model(x).argmax(1).numpy()
    assert (np.asarray(labels[3:5]) == expected).mean() > 0.99


def test_shipped_sam_configs_load():
    from magseg_hpc.config import load_config
    from magseg_hpc.train.setup import check_experiment, model_config

    repo = Path(__file__).resolve().parents[1]
    cfg = check_experiment(load_config(repo / "configs" / "sam_vit_b.yaml"))
    model = model_config(cfg).resolved()
    assert model.name == "sam_vit_b" and model.image_size == 1024
    assert model.pretrained.endswith("sam_vit_b_01ec64.pth")
    assert (cfg.optimizer_name(), cfg.train.lr, cfg.train.weight_decay) == ("adamw", 1e-4, 0.01)
    assert cfg.dice_weight() == 1.0 and cfg.train.method == "supervised"
    tiny = load_config(repo / "configs" / "cpu_tiny_sam.yaml")
    assert model_config(check_experiment(tiny)).pretrained is None
    # DeepLab keeps its defaults: SGD, plain cross-entropy
    deeplab = load_config(repo / "configs" / "cpu_tiny_supervised.yaml")
    assert (deeplab.optimizer_name(), deeplab.dice_weight()) == ("sgd", 0.0)
