"""Typed config tree: dataclass defaults, YAML files and dotted command-line overrides.

`load_config(yaml_path, ["train.epochs=3", "data.loader=gpu"])` returns a `Config`. Every key is
declared once below with `option(default, help, choices)`: its default, its one-line description
(shown by `cifar-dist config`) and, for a word, the words allowed. An unknown key or a value of
the wrong type is a `ConfigError` that names the key, what was expected and what was found.
This module imports no model: `model.name` is checked against the registry when the model is built.
"""
from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from cifar_dist.errors import ConfigError

KEYS_HINT = ("Config keys: `cifar-dist config [--config FILE] [key=value ...]` prints them all, resolved, with "
             "their descriptions and allowed values.")


def option(default, help: str, choices: tuple = ()):
    """One config key: its default, its description and, where it is a choice, the values allowed."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help, "choices": choices})
    return field(default=default, metadata={"help": help, "choices": choices})


@dataclass
class DataConfig:
    root: str = option("./data", "folder holding cifar-10-batches-py, cifar-10-python.tar.gz or the .npz")
    download: bool = option(True, "fetch the official archive (MD5-checked) when nothing is found under root")
    npz_name: str = option("cifar10.npz", "file name of the .npz form (x_train, y_train, x_test, y_test; NHWC uint8)")
    require_full_size: bool = option(True, "insist on 50,000/10,000 balanced images; false admits smaller sets")
    beton_dir: str = option("", "where `cifar-dist prepare` writes the .beton files (empty: <root>/beton)")
    val_fraction: float = option(0.1, "share of each class held out of train as the val split (0: evaluate on test)")
    split_seed: int = option(0, "seed of the stratified train/val split")
    loader: str = option("ffcv", "input path: FFCV betons, the whole split resident on the device, or "
                         "per-image PIL transforms in DataLoader workers (baseline)", ("ffcv", "gpu", "torchvision"))
    num_workers: int = option(2, "worker threads (ffcv) or processes (torchvision) per rank")
    train_subset: int = option(0, "train on the first N images of the train split only (0: all)")

    def beton_path(self) -> Path:
        return Path(self.beton_dir) if self.beton_dir else Path(self.root) / "beton"


@dataclass
class AugmentConfig:
    crop_padding: int = option(4, "random translation: crop after reflect padding by this many pixels (0: off)")
    flip: str = option("random", "horizontal flip: at random, alternating per image from epoch to epoch "
                       "(speed records), or none", ("random", "alternating", "none"))
    rotate_degrees: float = option(15.0, "random rotation in [-d, d] degrees (0: off)")
    perspective_distortion: float = option(0.2, "strength of the random perspective warp")
    perspective_prob: float = option(0.5, "probability of the perspective warp per image (0: off)")
    brightness: float = option(0.2, "colour jitter: brightness factor range 1 ± b (0: off)")
    contrast: float = option(0.2, "colour jitter: contrast factor range 1 ± c (0: off)")
    saturation: float = option(0.2, "colour jitter: saturation factor range 1 ± s (0: off)")
    hue: float = option(0.1, "colour jitter: hue shift in [-h, h] turns, h ≤ 0.5 (0: off)")
    cutout_size: int = option(0, "side of a square set to black at a random place (0: off)")
    mixup_prob: float = option(0.3, "probability that a batch is mixed with mixup")
    cutmix_prob: float = option(0.3, "probability that a batch is mixed with cutmix (exclusive with mixup)")
    mixup_alpha: float = option(1.0, "Beta(α, α) of the mixup ratio")
    cutmix_alpha: float = option(1.0, "Beta(α, α) of the cutmix area")


@dataclass
class ModelConfig:
    name: str = option("attention_resnet", "registered model (`cifar-dist model-summary` lists them and their options)")
    num_classes: int = option(10, "number of outputs")
    width: int = option(31, "attention_resnet: stem width; stages are 2/4/8/8 × width")
    dropout: float = option(0.3, "attention_resnet: dropout before the classifier")
    widths: list = option([64, 256, 256], "fast: channels of its three conv groups")
    bn_momentum: float = option(0.6, "fast: weight of the old BN statistics (airbench's convention)")
    scale: float = option(1 / 9, "fast: multiplier of the classifier's logits")


@dataclass
class TrainConfig:
    epochs: float = option(500.0, "length of the run in epochs; a fraction ends mid-epoch (9.9)")
    global_batch_size: int = option(128, "images per optimizer step over all ranks and accumulation steps")
    lr: float = option(0.1, "peak learning rate, in the units of train.lr_units")
    lr_units: str = option("torch", "torch: lr and weight_decay as torch's SGD takes them; decoupled_per_1024: "
                           "the speed records' convention, per 1024 images and independent of momentum",
                           ("torch", "decoupled_per_1024"))
    loss_reduction: str = option("mean", "reduce the per-image losses of a batch by their mean or sum",
                                 ("mean", "sum"))
    momentum: float = option(0.9, "SGD momentum")
    nesterov: bool = option(True, "Nesterov momentum")
    weight_decay: float = option(5e-4, "L2 weight decay, in the units of train.lr_units")
    decay_norm_and_bias: bool = option(False, "also decay BatchNorm parameters and biases")
    bias_scaler: float = option(1.0, "learning-rate multiplier of BatchNorm biases (not of their weight decay)")
    schedule: str = option("cosine", "learning-rate schedule", ("cosine", "triangular"))
    warmup_epochs: float = option(5.0, "cosine: linear warm-up from lr_start_factor over this many epochs")
    lr_peak_fraction: float = option(0.2, "triangular: share of the steps spent rising to the peak")
    lr_start_factor: float = option(0.0, "lr multiplier at the first step (warm-up start)")
    lr_end_factor: float = option(0.0, "lr multiplier at the last step")
    whiten_bias_epochs: float = option(0.0, "freeze the whitening layer's bias after this many epochs (0: never)")
    label_smoothing: float = option(0.1, "label smoothing of the cross-entropy")
    grad_clip_norm: float = option(1.0, "clip the global gradient norm to this (0: off)")
    grad_accum_steps: int = option(1, "micro-batches accumulated per optimizer step")
    amp: bool = option(True, "mixed precision (autocast)")
    amp_dtype: str = option("auto", "auto: bf16 where supported, else fp16 with a gradient scaler",
                            ("auto", "bf16", "fp16"))
    channels_last: bool = option(True, "channels_last memory format for images and model")
    sync_bn: str = option("auto", "SyncBatchNorm; auto: on for CUDA with more than one rank", ("auto", "on", "off"))
    compile: bool = option(False, "torch.compile the DDP-wrapped model")
    compile_mode: str = option("default", "torch.compile mode", ("default", "reduce-overhead", "max-autotune",
                                                                "max-autotune-no-cudagraphs"))
    ema_decay: float = option(0.999, "EMA decay per optimizer step, also when ema_every > 1 (0: no EMA)")
    ema_every: int = option(1, "update the EMA every this many optimizer steps")
    ema_ramp: str = option("none", "cubic: the decay of each update is multiplied by (step / total steps)³ "
                           "(airbench)", ("none", "cubic"))
    ema_start_epochs: float = option(0.0, "the EMA follows the model exactly for this many epochs")
    ema_lookahead: bool = option(False, "copy the EMA back into the model after each update and at the end "
                                 "(lookahead, speed-record style)")
    seed: int = option(0, "seed of the weights, data order and augmentation")
    deterministic: bool = option(False, "deterministic kernels: a resumed run ends bitwise like an uninterrupted one")
    resume: str = option("auto", "auto: continue from run.dir/last.pt when it exists; never; or a checkpoint path")
    checkpoint_interval_min: float = option(10.0, "also write last.pt every this many minutes (0: only per epoch)")
    max_nonfinite_steps: int = option(10, "stop (exit 3) after this many consecutive non-finite losses")
    max_steps: int = option(0, "stop after this many optimizer steps, with last.pt written (0: no limit)")
    tta: int = option(0, "test-time augmentation of the final evaluation: 0 none, 1 mirror, "
                      "2 mirror + ±1 px translations (airbench)", (0, 1, 2))
    device: str = option("auto", "device to train on", ("auto", "cpu", "cuda"))


@dataclass
class WandbConfig:
    mode: str = option("disabled", "offline: log locally, `wandb sync` later", ("online", "offline", "disabled"))
    project: str = option("cifar_dist", "wandb project")
    entity: str = option("", "wandb entity (empty: your default)")
    name: str = option("", "wandb run name (empty: chosen by wandb)")
    tags: list = option([], "wandb tags")


@dataclass
class LoggingConfig:
    print_every_steps: int = option(50, "a progress line every this many steps when not on a terminal")
    plot: bool = option(True, "redraw training_history.png each epoch")
    wandb: WandbConfig = field(default_factory=WandbConfig)


@dataclass
class RunConfig:
    name: str = option("run", "name of the run, prefix of its folder")
    dir: str = option("", "run folder (empty: runs/<name>-<timestamp>)")
    imports: list = option([], "Python modules imported before the run is built, e.g. ones that register "
                           "models of your own with @register_model")


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    run: RunConfig = field(default_factory=RunConfig)


def iter_keys(node, prefix: str = ""):
    """(dotted key, value, dataclass field) of every leaf key under node, in declaration order."""
    for f in dataclasses.fields(node):
        value = getattr(node, f.name)
        if dataclasses.is_dataclass(value):
            yield from iter_keys(value, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", value, f


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
                f"{', '.join(names)}{suggestion} (`cifar-dist config` lists every key)"
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


def _check_range(key: str, value, low, high, low_open=False, high_open=False) -> None:
    below = value <= low if low_open else value < low
    above = value >= high if high_open else value > high
    if below or above:
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        raise ConfigError(f"config key '{key}' must be in {interval}; got {value}")


def validate(cfg: Config) -> None:
    """Check choices and ranges that types alone do not express."""
    for key, value, f in iter_keys(cfg):
        allowed = f.metadata.get("choices")
        if allowed and value not in allowed:
            raise ConfigError(f"config key '{key}' must be one of {', '.join(map(str, allowed))}; got {value!r}")
    a, t = cfg.augment, cfg.train
    _check_range("data.val_fraction", cfg.data.val_fraction, 0.0, 1.0, high_open=True)
    for key in ("augment.mixup_prob", "augment.cutmix_prob", "augment.perspective_prob"):
        _check_range(key, get_key(cfg, key), 0.0, 1.0)
    if a.mixup_prob + a.cutmix_prob > 1.0:
        raise ConfigError("augment.mixup_prob + augment.cutmix_prob must be at most 1 (they are mutually "
                          f"exclusive); got {a.mixup_prob} + {a.cutmix_prob}")
    for kind in ("mixup", "cutmix"):
        if get_key(cfg, f"augment.{kind}_prob") > 0 and get_key(cfg, f"augment.{kind}_alpha") <= 0:
            raise ConfigError(f"config key 'augment.{kind}_alpha' must be > 0 when augment.{kind}_prob > 0")
    _check_range("augment.hue", a.hue, 0.0, 0.5)
    _check_range("augment.crop_padding", a.crop_padding, 0, 31)
    for key in ("augment.cutout_size", "augment.rotate_degrees", "train.lr", "train.weight_decay",
                "train.warmup_epochs", "train.whiten_bias_epochs", "train.ema_start_epochs",
                "train.label_smoothing", "train.grad_clip_norm", "train.max_steps", "train.checkpoint_interval_min"):
        if get_key(cfg, key) < 0:
            raise ConfigError(f"config key '{key}' must be >= 0; got {get_key(cfg, key)}")
    for key in ("train.global_batch_size", "train.grad_accum_steps", "train.ema_every", "train.max_nonfinite_steps"):
        if get_key(cfg, key) < 1:
            raise ConfigError(f"config key '{key}' must be at least 1; got {get_key(cfg, key)}")
    if t.epochs <= 0:
        raise ConfigError(f"config key 'train.epochs' must be > 0; got {t.epochs}")
    _check_range("train.momentum", t.momentum, 0.0, 1.0, high_open=True)
    _check_range("train.ema_decay", t.ema_decay, 0.0, 1.0, high_open=True)
    _check_range("train.lr_peak_fraction", t.lr_peak_fraction, 0.0, 1.0, low_open=True, high_open=True)
    _check_range("train.label_smoothing", t.label_smoothing, 0.0, 1.0, high_open=True)
    if t.bias_scaler <= 0:
        raise ConfigError(f"config key 'train.bias_scaler' must be > 0; got {t.bias_scaler}")


def get_key(cfg: Config, dotted_key: str):
    node = cfg
    for part in dotted_key.split("."):
        node = getattr(node, part)
    return node


def parse_override(text: str) -> tuple[str, object, str]:
    """Split 'a.b=value' and parse value as YAML (so 3 is int, 0.1 float, [1, 2] a list)."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' is not of the form key.sub=value (`cifar-dist config` lists the keys)")
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
    return apply_overrides(cfg, overrides)


def apply_overrides(cfg: Config, overrides: list[str]) -> Config:
    """Dotted key=value overrides applied to cfg in place (e.g. to a checkpoint's config); validated."""
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


def config_to_yaml(cfg: Config, header: str = "") -> str:
    """The whole tree as YAML, each key with its description and allowed values as a comment.

    Loading the text with `load_config` gives back cfg.
    """
    lines = [f"# {line}" if line else "#" for line in header.splitlines()]
    section_path: list[str] = []
    for key, value, f in iter_keys(cfg):
        *sections, name = key.split(".")
        common = 0
        while common < min(len(sections), len(section_path)) and sections[common] == section_path[common]:
            common += 1
        for depth in range(common, len(sections)):
            lines.append(f"{'  ' * depth}{sections[depth]}:")
        section_path = sections
        text = yaml.safe_dump(value, default_flow_style=True, allow_unicode=True, width=10_000).strip()
        text = text.removesuffix("\n...").removesuffix("...").strip()
        comment = f.metadata["help"]
        if f.metadata["choices"]:
            comment += f" [{' | '.join(map(str, f.metadata['choices']))}]"
        lines.append(f"{'  ' * len(sections)}{name}: {text}  # {comment}")
    return "\n".join(lines) + "\n"
