"""The typed experiment configuration: what to train, on which data, with which settings.

A config is a YAML file with the sections below; every key has a default, so a file only
states what differs. ``load_config`` validates the tree: an unknown key or a value of the
wrong type raises :class:`MagsegError` naming the key and listing the valid keys of its
section with their defaults. The ``model`` section is the model layer's: its keys, defaults
and checks are ``magseg_hpc.models.ModelConfig``'s, applied with the strong-augmentation
pools' names (also known only above this layer) by ``train.setup.check_experiment`` before
anything runs; this layer keeps the section as a mapping. ``key=value`` overrides (dotted
keys, values parsed as YAML) are applied before validation, so they are checked the same way.

Learning rate: ``train.lr`` is the base learning rate. When ``train.lr_reference_batch`` is
set, the rate actually used is ``lr * total_batch / lr_reference_batch`` where ``total_batch``
is ``train.batch_size`` (labelled images per process) times the number of processes, the
linear scaling of the AugSeg/UniMatch recipes (1e-3 per 16 labelled images). With
``lr_reference_batch: null`` ``train.lr`` is used as given.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from magseg_hpc.classes import ClassTable
from magseg_hpc.errors import MagsegError
from magseg_hpc.paths import absolute_spec, atomic_write
from magseg_hpc.yamlfile import load_yaml

__all__ = [
    "DataConfig",
    "TrainConfig",
    "ExperimentConfig",
    "RUNTIME_KEYS",
    "load_config",
    "config_from_dict",
    "SHIPPED_CONFIGS",
    "shipped_configs",
    "config_path",
    "config_to_dict",
    "save_config",
    "experiment_differences",
]


@dataclass
class DataConfig:
    """Where the slices come from and how they are split.

    Either ``volume`` (an image + labels zarr store, e.g. from ``magseg-hpc make-phantom``;
    2D slices are taken along ``axis``) or ``folder`` (the original study's layout:
    ``images/``, ``masks/`` colour PNGs, ``labeled.txt`` / ``unlabeled.txt`` / ``val.txt``).
    """

    volume: str | None = None
    image_var: str = "image"
    label_var: str = "labels"
    # A separate label store (e.g. from `magseg-hpc import-masks`); null: labels in ``volume``.
    label_volume: str | None = None
    # A separate volume for validation; when null, n_val slices are held out of ``volume``.
    val_volume: str | None = None
    val_label_volume: str | None = None
    folder: str | None = None
    image_dir: str = "images"  # sub-folders of ``folder``
    mask_dir: str = "masks"
    axis: Literal["z", "y", "x"] = "z"
    # Train on slices along these axes (e.g. [z, y, x]) so orthoplane fusion (segment-volume
    # --axes z,y,x) uses a model that has seen every plane; labelled slices stay along
    # ``axis``, and slices along the others carry the lines where they cross them.
    axes: list[str] | None = None
    n_labeled: int = 128
    labeled_selection: Literal["even", "random"] = "even"
    n_val: int = 22
    # Held-out validation slices: a contiguous block at the end of the axis (less leakage
    # from neighbouring labelled slices) or evenly spread.
    val_selection: Literal["block", "even"] = "block"
    # Explicit split files (one slice index or image id per line); override make_splits.
    labeled_split: str | None = None
    unlabeled_split: str | None = None
    val_split: str | None = None
    num_workers: int = 0
    # Volumes up to this size are read into memory once per process instead of per slice.
    cache_mb: int = 1024
    # On a masked reconstruction, mark each plane's outside in the model input (a value below
    # every sample value): a dark domain clipped to the masked value is otherwise the same
    # input as the outside (magseg_hpc.data.normalize). No effect on unmasked volumes.
    mark_outside: bool = True
    # Where the training volume's outside is (magseg_hpc.volume.support): auto detects it (a
    # constant outside at any value, NaN, or none); none, nan or a number decide it. A mask
    # file is folded in by `magseg-hpc ingest VOLUME OUT --mask MASK`.
    outside: str = "auto"


@dataclass
class TrainConfig:
    method: Literal["augseg", "supervised"] = "augseg"
    epochs: int = 30
    # Caps the total iterations of this call; the lr schedule still spans all epochs, so a
    # run stopped by max_iters and resumed with a larger cap matches an uninterrupted run.
    max_iters: int | None = None
    # An epoch of this many iterations instead of one pass over the unlabelled slices, so
    # that epochs, sup_only_epochs and the schedule mean the same on any volume size.
    iters_per_epoch: int | None = None
    batch_size: int = 8  # per process; labelled and unlabelled batches are this size each
    lr: float = 1.0e-3
    lr_reference_batch: int | None = None
    head_lr_mult: float = 1.0
    # auto: AdamW for SAM models (the study's SAM fine-tune), SGD with momentum otherwise
    optimizer: Literal["auto", "sgd", "adamw"] = "auto"
    momentum: float = 0.9  # SGD only
    weight_decay: float = 1.0e-4
    # supervised loss = cross-entropy + dice_weight x soft Dice; null: 1.0 for SAM, else 0
    dice_weight: float | None = None
    poly_power: float = 0.9
    threshold: float = 0.95
    # Scale each class's pseudo-label threshold by that class's mean teacher confidence in
    # the batch over the most confident class's (FreeMatch's self-adaptive class thresholds,
    # estimated per batch): a class the teacher is still unsure of (a dark domain next to an
    # exact-zero background) keeps pseudo-labels instead of leaving the loss to the easy ones.
    class_thresholds: bool = False
    ema_decay: float = 0.999
    # study: the teacher copies the student (decay 0) through epoch sup_only_epochs, the
    # first that uses pseudo-labels, then min(1 - 1/(t - N e0 + 1), ema_decay) (AugSeg's code).
    # mean_teacher: decay 0 only during the supervised-only epochs, then
    # min(1 - 1/(t + 1), ema_decay) (Tarvainen & Valpola): from its first pseudo-label on, the
    # teacher averages instead of copying the student it teaches, so one bad student step is
    # not fed back as the next step's targets.
    # average: min(1 - 1/(t + 1), ema_decay) from the first step, supervised-only epochs
    # included: the teacher (validated, best.pt, the first pseudo-labels) smooths the
    # student's swings from the start.
    ema_schedule: Literal["study", "mean_teacher", "average"] = "study"
    sup_only_epochs: int = 0
    uns_weight: float = 1.0
    # Epochs over which the unsupervised weight rises linearly from 0 to uns_weight once
    # pseudo-labels start (0: at once, as the study): the switch from supervised-only
    # training is then no shock to a student whose teacher it still is
    uns_rampup_epochs: int = 0
    cutmix_prob: float = 1.0
    # AugSeg's flag_extra_weak: the weak views join the student forward (BN statistics only)
    extra_weak: bool = False
    num_strong_augs: int = 3
    random_num_augs: bool = True
    # The strong-augmentation pool (a pool name or operations of magseg_hpc.data.augment's
    # STRONG_POOL, checked by train.setup.check_experiment); null: the study's pool.
    # "intensity_safe" keeps only operations that leave the intensity -> class
    # mapping intact (no solarize, brightness, autocontrast...): on magnetization data the
    # class IS the grey level, so the study's pool teaches the student contradictions.
    strong_ops: str | list[str] | None = None
    crop_size: int = 513
    # Share of crops placed to hold the sample (a labelled non-background pixel; for
    # unlabelled slices of a masked reconstruction, a non-masked pixel), as nnU-Net
    # oversamples foreground: a small sample in a large field of view is otherwise rarely seen.
    foreground_crop: float = 0.0
    scale_range: list[float] = field(default_factory=lambda: [0.5, 2.0])
    # Extra geometric augmentations (the study used horizontal flips only).
    vflip: bool = False
    rot90: bool = False
    # CutMix box centres uniform over the image instead of the study's bottom-right bias.
    uniform_cutmix_centre: bool = False
    checkpoint_every: int = 500
    eval_every: int = 0  # iterations; 0 evaluates at the end of every epoch
    log_every: int = 10
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # auto: bf16 autocast where the device computes bf16 natively (GPUs from Ampere on, CPUs
    # with AVX512_BF16/AMX), else fp32; losses, optimizer and EMA stay fp32 (precision.py)
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    threads: int | None = None  # torch intra-op threads per process on CPU; null = default


@dataclass
class ExperimentConfig:
    name: str = "experiment"
    seed: int = 0
    classes: dict = field(default_factory=lambda: ClassTable.default().to_dict())
    # the model section (magseg_hpc.models.ModelConfig's keys, checked and completed by
    # train.setup.check_experiment); num_classes comes from the class table
    model: dict = field(default_factory=dict)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    @property
    def class_table(self) -> ClassTable:
        return ClassTable.from_dict(self.classes)

    def model_dict(self) -> dict:
        """The model section as ``ModelConfig.from_dict`` takes it, with num_classes from the
        class table."""
        return {**self.model, "num_classes": self.class_table.num_classes}

    def is_sam(self) -> bool:
        return str(self.model.get("name", "")).startswith("sam_")

    def optimizer_name(self) -> str:
        """train.optimizer with "auto" resolved: AdamW for SAM (the study), else SGD."""
        if self.train.optimizer == "auto":
            return "adamw" if self.is_sam() else "sgd"
        return self.train.optimizer

    def dice_weight(self) -> float:
        """train.dice_weight with null resolved: 1.0 for SAM (the study's Dice), else 0."""
        if self.train.dice_weight is None:
            return 1.0 if self.is_sam() else 0.0
        return self.train.dice_weight


# Keys that change how a run is executed, not what it computes: an output dir may be resumed
# with different values for these.
RUNTIME_KEYS = frozenset(
    {
        "train.max_iters",
        "train.checkpoint_every",
        "train.eval_every",
        "train.log_every",
        "train.device",
        "train.precision",  # like the device: a resumed run may land on other hardware
        "train.threads",
        "data.num_workers",
        "data.cache_mb",
    }
)


# --- validation ------------------------------------------------------------------------------


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        (inner,) = typing.get_args(tp)
        return f"list[{_type_name(inner)}]"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """``value`` checked against the annotation ``tp``; ints are accepted where floats are."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        if value in typing.get_args(tp) and type(value) is not bool:
            return value
        raise MagsegError(f"{key}: {value!r} is not one of {_type_name(tp)}")
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            with contextlib.suppress(MagsegError):
                return _coerce(value, arg, key)
        raise MagsegError(f"{key}: {value!r} is not {_type_name(tp)}")
    if tp is type(None):
        if value is None:
            return None
    elif origin is list:
        (inner,) = typing.get_args(tp)
        if isinstance(value, (list, tuple)):
            return [_coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
    elif tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
    elif tp is dict:
        if isinstance(value, dict):
            return copy.deepcopy(value)
    else:  # pragma: no cover - a schema annotation this validator does not know
        raise TypeError(f"unsupported config annotation {tp!r}")
    raise MagsegError(f"{key}: expected {_type_name(tp)}, got {value!r}")


def _section_help(cls: type, prefix: str) -> str:
    parts = []
    for f in dataclasses.fields(cls):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(default) or default == {}:  # a section
            parts.append(f"{prefix}{f.name}.*")
        else:
            parts.append(f"{prefix}{f.name}={default!r}")
    return ", ".join(parts)


def _build(cls: type, raw: Any, prefix: str) -> Any:
    section = prefix.rstrip(".") or "top level"
    if not isinstance(raw, dict):
        raise MagsegError(
            f"config section '{section}' must be a mapping, got {raw!r}; "
            f"valid keys: {_section_help(cls, prefix)}"
        )
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in names:
            raise MagsegError(
                f"unknown config key '{prefix}{key}'; valid keys in {section} (with defaults): "
                f"{_section_help(cls, prefix)}"
            )
    kwargs = {}
    for name, value in raw.items():
        tp = hints[name]
        if value is None and (dataclasses.is_dataclass(tp) or tp is dict):
            # `model: null` would silently mean every default
            keys = (f": {_section_help(tp, f'{prefix}{name}.')}" if dataclasses.is_dataclass(tp)
                    else "")
            raise MagsegError(f"config section '{prefix}{name}' is null; give its keys or "
                              f"leave it out for the defaults{keys}")
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, value, f"{prefix}{name}.")
        else:
            try:
                kwargs[name] = _coerce(value, tp, f"{prefix}{name}")
            except MagsegError as e:
                raise MagsegError(
                    f"{e}; valid keys in {section} (with defaults): {_section_help(cls, prefix)}"
                ) from None
    return cls(**kwargs)


def _check_values(cfg: ExperimentConfig) -> None:
    cfg.class_table  # noqa: B018 - raises MagsegError for a malformed class table
    if "num_classes" in cfg.model:
        raise MagsegError("model.num_classes: the class count comes from the class table "
                          "(classes.names); remove model.num_classes")
    t, d = cfg.train, cfg.data
    if t.batch_size < 2:
        # BatchNorm in training mode needs two values a channel; the decoder's image-pooling
        # branch has one a image, so a batch of 1 fails on every rank after submission
        raise MagsegError(f"train.batch_size must be >= 2 (BatchNorm needs two images a "
                          f"process), got {t.batch_size}")
    positive = {"train.epochs": t.epochs, "train.crop_size": t.crop_size,
                "train.checkpoint_every": t.checkpoint_every, "train.log_every": t.log_every,
                "data.n_labeled": d.n_labeled}
    for key, value in positive.items():
        if value < 1:
            raise MagsegError(f"{key} must be >= 1, got {value}")
    for key, value in {
        "train.max_iters": t.max_iters,
        "train.iters_per_epoch": t.iters_per_epoch,
        "train.lr_reference_batch": t.lr_reference_batch,
        "train.threads": t.threads,
    }.items():
        if value is not None and value < 1:
            raise MagsegError(f"{key} must be >= 1 or null, got {value}")
    for key, value in {
        "train.eval_every": t.eval_every,
        "train.sup_only_epochs": t.sup_only_epochs,
        "train.uns_rampup_epochs": t.uns_rampup_epochs,
        "data.n_val": d.n_val,
        "data.num_workers": d.num_workers,
        "data.cache_mb": d.cache_mb,
        "train.weight_decay": t.weight_decay,
        "train.momentum": t.momentum,
        "train.uns_weight": t.uns_weight,
        "train.dice_weight": cfg.dice_weight(),
        "train.poly_power": t.poly_power,
    }.items():
        if value < 0:
            raise MagsegError(f"{key} must be >= 0, got {value}")
    if not 0 <= t.momentum < 1:
        raise MagsegError(f"train.momentum must be in [0, 1), got {t.momentum}")
    if not 0 < t.lr < math.inf:
        raise MagsegError(f"train.lr must be a number > 0, got {t.lr}")
    _check_outside(str(d.outside))
    if not 0 < t.head_lr_mult < math.inf:
        raise MagsegError(f"train.head_lr_mult must be a number > 0, got {t.head_lr_mult}")
    if not 0 <= t.threshold <= 1:
        raise MagsegError(f"train.threshold (pseudo-label confidence) must be in [0, 1], "
                          f"got {t.threshold}")
    if not 0 <= t.ema_decay < 1:
        raise MagsegError(f"train.ema_decay must be in [0, 1), got {t.ema_decay}")
    if not 0 <= t.foreground_crop <= 1:
        raise MagsegError(f"train.foreground_crop must be in [0, 1], got {t.foreground_crop}")
    if not 0 <= t.cutmix_prob <= 1:
        raise MagsegError(f"train.cutmix_prob must be in [0, 1], got {t.cutmix_prob}")
    if len(t.scale_range) != 2 or not 0 < t.scale_range[0] <= t.scale_range[1]:
        raise MagsegError(f"train.scale_range must be [low, high] with 0 < low <= high, "
                          f"got {t.scale_range}")
    if t.num_strong_augs < 0:
        raise MagsegError(f"train.num_strong_augs must be >= 0, got {t.num_strong_augs}")
    if d.axes is not None:
        if d.axis not in d.axes:
            raise MagsegError(f"data.axes {d.axes} must include data.axis ({d.axis}), the axis "
                              "of the labelled slices")
        if len(set(d.axes)) != len(d.axes) or not set(d.axes) <= {"z", "y", "x"}:
            raise MagsegError(f"data.axes must be distinct axes among z, y, x; got {d.axes}")
        if len(d.axes) > 1 and d.folder:
            raise MagsegError("data.axes needs a volume (data.volume), not data.folder")
    if not 0 <= cfg.seed < 2**63:
        raise MagsegError(f"seed must be in [0, 2**63) (torch's seed range), got {cfg.seed}")
    _check_finite(cfg)


def _check_finite(section: Any, prefix: str = "") -> None:
    """Every number of the config finite: NaN passes any `< 0` test above (a NaN momentum
    or weight decay would turn the weights NaN at the first step), so each is checked here."""
    for f in dataclasses.fields(section):
        value = getattr(section, f.name)
        if dataclasses.is_dataclass(value):
            _check_finite(value, f"{prefix}{f.name}.")
            continue
        for v in value if isinstance(value, list) else [value]:
            if isinstance(v, float) and not math.isfinite(v):
                raise MagsegError(f"{prefix}{f.name} must be a finite number, got {value}")


def config_from_dict(raw: dict) -> ExperimentConfig:
    """Validate a plain dict (e.g. parsed YAML) into an :class:`ExperimentConfig`."""
    cfg = _build(ExperimentConfig, raw if raw is not None else {}, "")
    _check_values(cfg)
    return cfg


def _apply_override(raw: dict, override: str) -> None:
    key, sep, text = override.partition("=")
    key = key.strip()
    if not sep or not key:
        raise MagsegError(f"override {override!r} is not key=value (e.g. train.max_iters=100)")
    try:
        value = load_yaml(text)
    except yaml.YAMLError as e:
        raise MagsegError(
            f"override {override!r}: value is not valid YAML ({_one_line(e)})") from None
    node = raw
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise MagsegError(f"override {override!r}: {part!r} is not a section")
        node = child
    node[parts[-1]] = value


def _one_line(error: Exception) -> str:
    return " ".join(str(error).split())


SHIPPED_CONFIGS = Path(__file__).resolve().parent / "configs"


def shipped_configs() -> dict[str, Path]:
    """The configs that come with the package (``configs/`` in the repository), by name."""
    return {p.stem: p for p in sorted(SHIPPED_CONFIGS.glob("*.yaml"))}


def config_path(name_or_path: str | Path) -> Path:
    """A config file: an existing path as given, else a shipped config by name (``cpu_best``
    or ``cpu_best.yaml``), so ``--config cpu_best`` works from any folder."""
    path = Path(name_or_path)
    if path.exists() or len(path.parts) != 1:
        return path
    shipped = shipped_configs()
    name = path.stem if path.suffix in (".yaml", ".yml") else path.name
    if name in shipped:
        return shipped[name]
    raise MagsegError(f"config {name_or_path}: no such file, and no shipped config of that name "
                      f"({', '.join(shipped)}); give a path or one of those names "
                      "(magseg-hpc configs lists them)")


def read_config_text(name_or_path: str | Path) -> tuple[Path, str]:
    """(path, text) of a config file (a path or a shipped config's name); a missing path, a
    folder or a binary file is one line."""
    path = config_path(name_or_path)
    try:
        return path, path.read_text()
    except OSError as e:
        name = path.stem if path.suffix in (".yaml", ".yml") else path.name
        hint = (f", or name the shipped config: --config {name} works from any folder"
                if not path.exists() and name in shipped_configs() else "")
        raise MagsegError(f"cannot read config {path}: {e.strerror}; check the path{hint}"
                          ) from None
    except UnicodeDecodeError:
        raise MagsegError(f"config {path} is not a text (YAML) file; check the path") from None


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> ExperimentConfig:
    """Read a YAML experiment config (a path or a shipped config's name), apply dotted
    ``key=value`` overrides and validate."""
    path, text = read_config_text(path)
    try:
        raw = load_yaml(text)
    except yaml.YAMLError as e:
        raise MagsegError(f"config {path} is not valid YAML: {_one_line(e)}") from None
    if raw is None or raw == {}:
        raise MagsegError(
            f"config {path} is empty; state at least the data (data.volume or data.folder) "
            "and the model, e.g. start from configs/cpu_tiny.yaml"
        )
    if not isinstance(raw, dict):
        raise MagsegError(f"config {path} must be a YAML mapping, got {type(raw).__name__}")
    raw.setdefault("name", path.stem)
    for override in overrides:
        _apply_override(raw, override)
    return _absolute_paths(config_from_dict(raw))


def _absolute_paths(cfg: ExperimentConfig) -> ExperimentConfig:
    """Relative data and weight paths are taken from the working directory and stored
    absolute, so the saved config and any job launched from it name the same files."""
    d = cfg.data
    for key in ("volume", "label_volume", "val_volume", "val_label_volume", "folder",
                "labeled_split", "unlabeled_split", "val_split"):
        value = getattr(d, key)
        if value:
            setattr(d, key, absolute_spec(value))
    for key in ("pretrained", "checkpoint"):  # checkpoint: SAM's name for pretrained
        value = cfg.model.get(key)
        if isinstance(value, str) and value.strip().lower() not in ("", "none", "null"):
            cfg.model[key] = absolute_spec(value)
    return cfg


def config_to_dict(cfg: ExperimentConfig) -> dict:
    """The full resolved config (every key, defaults included) as plain data."""
    return dataclasses.asdict(cfg)


def save_config(cfg: ExperimentConfig, path: str | Path) -> None:
    """Write the resolved config as YAML, atomically (a reader never sees half a file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, yaml.safe_dump(config_to_dict(cfg), sort_keys=False))


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in d.items():
        if isinstance(value, dict) and key != "classes":
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def experiment_differences(a: dict, b: dict) -> list[str]:
    """Dotted keys whose values differ between two resolved configs, runtime keys excepted."""
    # A key missing on one side (a config saved before the key existed) counts as its default.
    defaults = _flatten(config_to_dict(ExperimentConfig()))
    fa, fb = {**defaults, **_flatten(a)}, {**defaults, **_flatten(b)}
    keys = sorted(set(fa) | set(fb))
    return [k for k in keys if k not in RUNTIME_KEYS and fa.get(k) != fb.get(k)]


def _check_outside(text: str) -> None:
    """data.outside: auto, none, nan or a finite number (volume.support decides with it)."""
    try:
        ok = text.lower() in ("auto", "none", "nan") or math.isfinite(float(text))
    except ValueError:
        ok = False
    if not ok:
        raise MagsegError(f"data.outside {text!r}: choose auto (detect it), none (unmasked), "
                          "nan, or the outside's exact value (e.g. 0)")
