"""Typed config tree: dataclass defaults, YAML files and dotted command-line overrides.

`load_config(yaml_path, ["train.epochs=3", "data.loader=gpu"])` returns a `Config`. Every key
is checked against the dataclasses below: an unknown key or a value of the wrong type is a
`ConfigError` that names the key, what was expected and what was found.
"""
from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml


class ConfigError(ValueError):
    """A config file or override that does not fit the config tree."""


@dataclass
class DataConfig:
    root: str = "./data"  # folder holding cifar-10-batches-py, cifar-10-python.tar.gz or an .npz
    download: bool = True  # fetch the official archive when nothing is found under root
    npz_name: str = "cifar10.npz"
    require_full_size: bool = True  # 50,000/10,000 images, balanced; false admits any smaller set
    beton_dir: str = ""  # empty: <root>/beton
    val_fraction: float = 0.1
    split_seed: int = 0
    loader: str = "ffcv"  # ffcv | gpu | torchvision
    num_workers: int = 2
    train_subset: int = 0  # use only the first N images of the train split (0: all)

    def beton_path(self) -> Path:
        return Path(self.beton_dir) if self.beton_dir else Path(self.root) / "beton"


@dataclass
class AugmentConfig:
    crop_padding: int = 4  # random crop after reflect padding by this many pixels (0: off)
    flip: str = "random"  # random | alternating | none
    rotate_degrees: float = 15.0
    perspective_distortion: float = 0.2
    perspective_prob: float = 0.5
    brightness: float = 0.2
    contrast: float = 0.2
    saturation: float = 0.2
    hue: float = 0.1
    cutout_size: int = 0  # side of the square cut out (0: off)
    mixup_prob: float = 0.3
    cutmix_prob: float = 0.3
    mixup_alpha: float = 1.0
    cutmix_alpha: float = 1.0


@dataclass
class ModelConfig:
    name: str = "attention_resnet"  # attention_resnet | fast | resnet18
    num_classes: int = 10
    width: int = 31  # attention_resnet: stem width
    dropout: float = 0.3  # attention_resnet: dropout before the classifier
    widths: list = field(default_factory=lambda: [64, 256, 256])  # fast: the three conv groups
    bn_momentum: float = 0.6  # fast: weight of the old BN statistics (airbench); torch momentum = 1 - this
    scale: float = 1 / 9  # fast: multiplier of the classifier's logits


@dataclass
class TrainConfig:
    epochs: int = 500
    global_batch_size: int = 128
    optimizer: str = "sgd"
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4  # not applied to BN parameters and biases
    schedule: str = "cosine"  # cosine | triangular
    warmup_epochs: float = 5.0
    peak_epoch_fraction: float = 0.2  # triangular: where the peak sits
    min_lr_ratio: float = 0.0
    label_smoothing: float = 0.1
    grad_clip_norm: float = 1.0  # 0: off
    grad_accum_steps: int = 1
    amp: bool = True
    amp_dtype: str = "auto"  # auto | bf16 | fp16
    channels_last: bool = True
    sync_bn: str = "auto"  # auto | on | off
    compile: bool = False
    compile_mode: str = "default"
    ema_decay: float = 0.999  # per optimizer step, also when ema_every > 1 (0: no EMA)
    ema_every: int = 1
    ema_warmup_steps: int = 0  # decay ramps linearly from 0 over this many EMA updates
    ema_lookahead: bool = False  # reset the model to the EMA after each update (speed-record style)
    seed: int = 0
    deterministic: bool = False
    resume: str = "auto"  # auto | never | <path to a checkpoint>
    checkpoint_interval_min: float = 10.0
    max_nonfinite_steps: int = 10
    max_steps: int = 0  # stop after this many optimizer steps (0: no limit); for tests
    tta: bool = False  # flip + translate test-time augmentation at evaluation
    device: str = "auto"  # auto | cpu | cuda


@dataclass
class WandbConfig:
    mode: str = "disabled"  # online | offline | disabled
    project: str = "cifar_dist"
    entity: str = ""
    name: str = ""
    tags: list = field(default_factory=list)


@dataclass
class LoggingConfig:
    print_every_steps: int = 50  # plain progress lines when not on a terminal
    plot: bool = True
    wandb: WandbConfig = field(default_factory=WandbConfig)


@dataclass
class RunConfig:
    name: str = "run"
    dir: str = ""  # empty: runs/<name>-<timestamp>


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    run: RunConfig = field(default_factory=RunConfig)


CHOICES = {
    "data.loader": ("ffcv", "gpu", "torchvision"),
    "augment.flip": ("random", "alternating", "none"),
    "train.optimizer": ("sgd",),
    "train.schedule": ("cosine", "triangular"),
    "train.amp_dtype": ("auto", "bf16", "fp16"),
    "train.sync_bn": ("auto", "on", "off"),
    "train.device": ("auto", "cpu", "cuda"),
    "logging.wandb.mode": ("online", "offline", "disabled"),
}


def _coerce(key: str, value, expected_type, raw: str | None):
    """Return value as expected_type, or raise ConfigError naming the key.

    raw is the override's text: a string key takes it as written, so `train.sync_bn=on` stays "on"
    and `run.name=0123` stays "0123", although YAML reads them as a boolean and a number; in YAML
    files, on/off/yes/no become "on"/"off".
    """
    if expected_type is str and raw is not None and not isinstance(value, str):
        return raw.strip()
    if expected_type is str and isinstance(value, bool):
        return "on" if value else "off"
    if expected_type is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if expected_type is float and isinstance(value, str):  # YAML 1.1 reads "1e-6" as a string
        try:
            return float(value)
        except ValueError:
            pass
    if expected_type is list and isinstance(value, tuple):
        return list(value)
    if isinstance(value, expected_type) and not (expected_type is int and isinstance(value, bool)):
        return value
    raise ConfigError(
        f"config key '{key}' expects {expected_type.__name__}, got {value!r} ({type(value).__name__})"
    )


def _set_key(node, dotted_key: str, value, source: str, raw: str | None = None) -> None:
    root, parts = node, dotted_key.split(".")
    for depth, part in enumerate(parts):
        key_so_far = ".".join(parts[: depth + 1])
        names = [f.name for f in dataclasses.fields(node)]
        if part not in names:
            hint = difflib.get_close_matches(part, names, n=1)
            suggestion = f"; did you mean '{'.'.join(parts[:depth] + hint)}'?" if hint else ""
            raise ConfigError(
                f"unknown config key '{key_so_far}' in {source}; known keys here: "
                f"{', '.join(names)}{suggestion}"
            )
        hints = typing.get_type_hints(type(node))
        if depth < len(parts) - 1:
            node = getattr(node, part)
            if not dataclasses.is_dataclass(node):
                raise ConfigError(f"config key '{key_so_far}' in {source} is a value, not a section")
            continue
        expected = hints[part]
        if dataclasses.is_dataclass(expected):
            if not isinstance(value, dict):
                raise ConfigError(f"config key '{key_so_far}' in {source} is a section: expected a mapping")
            for sub_key, sub_value in value.items():
                _set_key(root, f"{dotted_key}.{sub_key}", sub_value, source)
            return
        setattr(node, part, _coerce(dotted_key, value, typing.get_origin(expected) or expected, raw))


def _apply_mapping(cfg: Config, mapping: dict, source: str) -> None:
    for key, value in mapping.items():
        _set_key(cfg, str(key), value, source)


def validate(cfg: Config) -> None:
    """Check choices and ranges that types alone do not express."""
    for key, allowed in CHOICES.items():
        value = get_key(cfg, key)
        if value not in allowed:
            raise ConfigError(f"config key '{key}' must be one of {', '.join(allowed)}; got {value!r}")
    from cifar_dist.models import BUILDERS  # the registry: models can be added at run time

    if cfg.model.name not in BUILDERS:
        raise ConfigError(f"config key 'model.name' must be one of {', '.join(BUILDERS)}; got {cfg.model.name!r}")
    if not 0.0 <= cfg.data.val_fraction < 1.0:
        raise ConfigError(f"config key 'data.val_fraction' must be in [0, 1); got {cfg.data.val_fraction}")
    for key in ("augment.mixup_prob", "augment.cutmix_prob", "augment.perspective_prob"):
        if not 0.0 <= get_key(cfg, key) <= 1.0:
            raise ConfigError(f"config key '{key}' must be a probability in [0, 1]; got {get_key(cfg, key)}")
    if cfg.augment.mixup_prob + cfg.augment.cutmix_prob > 1.0:
        raise ConfigError(
            "augment.mixup_prob + augment.cutmix_prob must be at most 1 (they are mutually exclusive); "
            f"got {cfg.augment.mixup_prob} + {cfg.augment.cutmix_prob}"
        )
    for kind in ("mixup", "cutmix"):
        if get_key(cfg, f"augment.{kind}_prob") > 0 and get_key(cfg, f"augment.{kind}_alpha") <= 0:
            raise ConfigError(f"config key 'augment.{kind}_alpha' must be > 0 when augment.{kind}_prob > 0")
    if not 0.0 <= cfg.augment.hue <= 0.5:
        raise ConfigError(f"config key 'augment.hue' must be in [0, 0.5]; got {cfg.augment.hue}")
    if not 0 <= cfg.augment.crop_padding < 32:
        raise ConfigError(f"config key 'augment.crop_padding' must be in [0, 31]; got {cfg.augment.crop_padding}")
    positive = ("train.global_batch_size", "train.grad_accum_steps", "train.ema_every", "train.epochs")
    for key in positive:
        if get_key(cfg, key) < 1:
            raise ConfigError(f"config key '{key}' must be at least 1; got {get_key(cfg, key)}")
    if not 0.0 <= cfg.train.ema_decay < 1.0:
        raise ConfigError(f"config key 'train.ema_decay' must be in [0, 1); got {cfg.train.ema_decay}")


def get_key(cfg: Config, dotted_key: str):
    node = cfg
    for part in dotted_key.split("."):
        node = getattr(node, part)
    return node


def parse_override(text: str) -> tuple[str, object, str]:
    """Split 'a.b=value' and parse value as YAML (so 3 is int, 0.1 float, [1, 2] a list)."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' is not of the form key.sub=value")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    if value is None:
        value = ""
    return key.strip(), value, raw


def load_config(yaml_path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    """Defaults, then the YAML file, then the dotted overrides; validated."""
    cfg = Config()
    if yaml_path is not None:
        path = Path(yaml_path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            mapping = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"config file {path} is not valid YAML: {err}") from None
        if not isinstance(mapping, dict):
            raise ConfigError(f"config file {path} must hold a mapping of sections, got {type(mapping).__name__}")
        _apply_mapping(cfg, mapping, str(path))
    for text in overrides:
        key, value, raw = parse_override(text)
        _set_key(cfg, key, value, "command-line override", raw)
    validate(cfg)
    return cfg


def config_to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def config_from_dict(mapping: dict) -> Config:
    cfg = Config()
    _apply_mapping(cfg, mapping, "saved config")
    validate(cfg)
    return cfg
