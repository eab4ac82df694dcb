"""The typed experiment config: validation, overrides, round trip, experiment identity."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from magseg_hpc.config import (
    ExperimentConfig,
    config_to_dict,
    experiment_differences,
    load_config,
    save_config,
)
from magseg_hpc.errors import MagsegError
from magseg_hpc.train.setup import check_experiment

REPO = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_defaults_and_name_from_file(tmp_path):
    cfg = load_config(write(tmp_path, {"train": {"epochs": 3}}))
    assert isinstance(cfg, ExperimentConfig)
    assert cfg.name == "exp"
    assert cfg.train.epochs == 3
    assert cfg.train.threshold == 0.95 and cfg.train.ema_decay == 0.999
    assert cfg.class_table.names == ("background", "domain_minus", "domain_plus")
    assert cfg.model_dict()["num_classes"] == 3


def test_unknown_key_names_the_valid_keys_with_defaults(tmp_path):
    with pytest.raises(MagsegError) as e:
        load_config(write(tmp_path, {"train": {"lr": 0.1, "learning_rate": 0.1}}))
    msg = str(e.value)
    assert "'train.learning_rate'" in msg
    assert "train.lr=0.001" in msg and "train.max_iters=None" in msg
    assert "train.checkpoint_every=500" in msg


def test_unknown_top_level_section(tmp_path):
    with pytest.raises(MagsegError, match=r"unknown config key 'trainer'.*train\.\*"):
        load_config(write(tmp_path, {"trainer": {}}))


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        ({"train": {"epochs": "ten"}}, "train.epochs: expected int"),
        ({"train": {"epochs": 2.5}}, "train.epochs: expected int"),
        ({"train": {"precision": True}}, "train.precision: True is not one of"),
        ({"train": {"method": "fixmatch"}}, "train.method: 'fixmatch' is not one of"),
        ({"seed": True}, "seed: expected int"),
        ({"data": {"axis": "w"}}, "data.axis"),
        ({"train": {"scale_range": [1, "a"]}}, "train.scale_range[1]"),
        ({"model": {"backbone": "vit"}}, "model.backbone"),
        ({"train": "fast"}, "section 'train' must be a mapping"),
    ],
)
def test_wrong_types_fail_with_the_key(tmp_path, data, fragment):
    # the model section's keys are the model layer's, checked with the experiment
    with pytest.raises(MagsegError) as e:
        check_experiment(load_config(write(tmp_path, data)))
    assert fragment in str(e.value)


def test_bad_values(tmp_path):
    with pytest.raises(MagsegError, match="train.batch_size must be >= 2"):
        load_config(write(tmp_path, {"train": {"batch_size": 0}}))
    with pytest.raises(MagsegError, match="ema_decay"):
        load_config(write(tmp_path, {"train": {"ema_decay": 1.0}}))
    with pytest.raises(MagsegError, match="class"):
        load_config(write(tmp_path, {"classes": {"names": ["a", "b"], "colors": [[0, 0, 0]]}}))


def test_overrides_are_yaml_and_validated(tmp_path):
    path = write(tmp_path, {"train": {"epochs": 3}})
    cfg = load_config(path, ["train.max_iters=100", "seed=7", "train.lr=2e-3",
                             "train.scale_range=[0.5, 1.0]", "data.val_volume=null",
                             "model.backbone=resnet18"])
    assert cfg.train.max_iters == 100 and cfg.seed == 7 and cfg.train.lr == 0.002
    assert cfg.train.scale_range == [0.5, 1.0] and cfg.model["backbone"] == "resnet18"
    assert cfg.train.epochs == 3
    with pytest.raises(MagsegError, match="unknown config key 'train.max_iter'"):
        load_config(path, ["train.max_iter=5"])
    with pytest.raises(MagsegError, match="not key=value"):
        load_config(path, ["train.max_iters"])
    with pytest.raises(MagsegError, match="train.max_iters: expected int | null"):
        load_config(path, ["train.max_iters=lots"])


def test_int_accepted_for_float_and_relative_paths_made_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_config(write(tmp_path, {"train": {"lr": 1}, "data": {"volume": "ph.zarr"}}))
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)
    assert cfg.data.volume == str(tmp_path / "ph.zarr")


def test_round_trip_and_experiment_differences(tmp_path):
    cfg = load_config(write(tmp_path, {"train": {"epochs": 3}}), ["train.max_iters=10"])
    save_config(cfg, tmp_path / "out" / "config.yaml")
    again = load_config(tmp_path / "out" / "config.yaml")
    assert config_to_dict(again) == config_to_dict(cfg)
    runtime = load_config(tmp_path / "out" / "config.yaml",
                          ["train.max_iters=99", "train.checkpoint_every=7", "train.device=cpu"])
    assert experiment_differences(config_to_dict(cfg), config_to_dict(runtime)) == []
    other = load_config(tmp_path / "out" / "config.yaml", ["train.lr=0.5", "seed=3"])
    assert experiment_differences(config_to_dict(cfg), config_to_dict(other)) == [
        "seed", "train.lr"]


@pytest.mark.parametrize("name", ["augseg_semi128", "supervised_128", "cpu_tiny",
                                  "cpu_tiny_supervised"])
def test_shipped_configs_load(name):
    cfg = load_config(REPO / "configs" / f"{name}.yaml")
    assert cfg.name == name
    assert cfg.train.method == ("supervised" if "supervised" in name else "augseg")


def test_shipped_configs_by_name_from_any_folder(tmp_path, monkeypatch, capsys):
    """--config cpu_best works outside the repository; `magseg-hpc configs` lists them."""
    from magseg_hpc.cli import main
    from magseg_hpc.config import config_path, load_config, shipped_configs

    monkeypatch.chdir(tmp_path)
    assert {"cpu_best", "cpu_best_supervised", "cpu_tiny", "augseg_semi128"} <= set(
        shipped_configs())
    assert load_config("cpu_best").name == "cpu_best"
    assert config_path("cpu_best.yaml") == shipped_configs()["cpu_best"]
    (tmp_path / "cpu_best").write_text("seed: 3\nmodel: {backbone: resnet18}\n")
    assert config_path("cpu_best") == Path("cpu_best")  # a file here wins
    with pytest.raises(MagsegError, match="no shipped config of that name"):
        config_path("nope")
    assert main(["configs"]) == 0
    listed = capsys.readouterr().out
    assert "cpu_best " in listed and "The recommended CPU recipe" in listed


def test_yaml_key_given_twice_is_refused_at_any_depth():
    """safe_load keeps the last of two equal keys silently; load_yaml names both lines."""
    from magseg_hpc.yamlfile import load_yaml

    with pytest.raises(yaml.YAMLError, match=r"key 'lr' is given twice \(line 2 and line 4\)"):
        load_yaml("train:\n  lr: 1\n  epochs: 2\n  lr: 3\n")
    assert load_yaml("a: 1\nb: {a: 2}\n") == {"a": 1, "b": {"a": 2}}  # other mappings: fine


def test_configs_lists_each_config_with_its_whole_first_sentence(capsys):
    """`magseg-hpc configs` gives each shipped config's first sentence, never cut mid-way."""
    from magseg_hpc.cli import main
    from magseg_hpc.commands.configs import summary
    from magseg_hpc.config import shipped_configs

    assert main(["configs"]) == 0
    listed = " ".join(capsys.readouterr().out.split())
    for name, path in shipped_configs().items():
        line = summary(path)
        assert line.endswith((".", "!", "?")) and len(line) > 20, (name, line)
        assert f"{name} {line}" in listed
    assert "on 2 cores (3000 iterations) with 8 labelled slices." in summary(
        shipped_configs()["cpu_best"])
