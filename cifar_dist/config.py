"""Typed config tree: dataclass defaults, YAML files and dotted command-line overrides.

`load_config(yaml_path, ["train.epochs=3", "data.loader=gpu"])` returns a validated `Config`. Every
key is declared once below with `option(default, help, choices=..., range=...)` (see `keys.Key`):
its default, its one-line description (shown by `cifar-dist config`) and the values it allows. A
model's own keys (`model.widths`, ...) are declared by the model at registration; the `model` section
is checked against the registry, which imports the models (and torch) on first use. An unknown key, a
value of the wrong type or out of range is a `ConfigError` that names the key, what was expected and
what was found. Rules between keys (mixup + cutmix ≤ 1, ...) are in `validate`.
"""
from __future__ import annotations

import dataclasses
import difflib
import importlib
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from cifar_dist.errors import ConfigError
from cifar_dist.keys import Key, coerce

KEYS_HINT = ("Config keys: `cifar-dist config [--config FILE] [key=value ...]` prints them all, resolved, with "
             "their descriptions and allowed values.")
AT_LEAST_0, AT_LEAST_1, ABOVE_0, FRACTION, PROBABILITY = "[0, inf)", "[1, inf)", "(0, inf)", "[0, 1)", "[0, 1]"
TTA_LEVELS = (0, 1, 2, "heavy")  # `engine.evaluation.tta_views` says what each level averages


def parse_step_window(text: str) -> tuple[int, int] | None:
    """'START:STOP' (train.profile) as (START, STOP) with 0 <= START < STOP; None when text is not that."""
    start, sep, stop = str(text).partition(":")
    if not (sep and start.strip().isdigit() and stop.strip().isdigit()) or int(start) >= int(stop):
        return None
    return int(start), int(stop)


def _step_window_problem(text: str) -> str | None:
    if text == "" or parse_step_window(text):
        return None
    return "empty or 'START:STOP', two step numbers with START < STOP (e.g. '10:15'; quote it in YAML)"


def option(default, help: str, choices: tuple = (), range: str = "", check=None):
    """One config key as a dataclass field: its declaration (`keys.Key`) rides in the field's metadata."""
    key = Key(default, help, tuple(choices), range, check)
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"key": key})
    return field(default=default, metadata={"key": key})


@dataclass
class DataConfig:
    root: str = option("./data", "folder holding cifar-10-batches-py, cifar-10-python.tar.gz or the .npz")
    download: bool = option(True, "fetch the official archive (MD5-checked) when nothing is found under root")
    npz_name: str = option("cifar10.npz", "file name of the .npz form (x_train, y_train, x_test, y_test; NHWC uint8)")
    require_full_size: bool = option(True, "insist on 50,000/10,000 balanced images; false admits smaller sets")
    beton_dir: str = option("", "where `cifar-dist prepare` writes the .beton files (empty: <root>/beton)")
    val_fraction: float = option(0.1, "share of each class held out of train as the val split (0: evaluate on test)",
                                 range=FRACTION)
    split_seed: int = option(0, "seed of the stratified train/val split")
    loader: str = option("ffcv", "input path: FFCV betons, the whole split resident on the device, or "
                         "per-image PIL transforms in DataLoader workers (baseline)", ("ffcv", "gpu", "torchvision"))
    num_workers: int = option(2, "worker threads (ffcv) or processes (torchvision) per rank", range=AT_LEAST_0)
    train_subset: int = option(0, "train on the first N images of the train split only (0: all)", range=AT_LEAST_0)

    def beton_path(self) -> Path:
        return Path(self.beton_dir) if self.beton_dir else Path(self.root) / "beton"


@dataclass
class AugmentConfig:
    crop_padding: int = option(4, "random translation: crop after reflect padding by this many pixels (0: off)",
                               range="[0, 31]")
    flip: str = option("random", "horizontal flip: at random, alternating per image from epoch to epoch "
                       "(speed records), or none", ("random", "alternating", "none"))
    rotate_degrees: float = option(15.0, "random rotation in [-d, d] degrees (0: off)", range="[0, 180]")
    perspective_distortion: float = option(0.2, "strength of the random perspective warp", range=PROBABILITY)
    perspective_prob: float = option(0.5, "probability of the perspective warp per image (0: off)", range=PROBABILITY)
    brightness: float = option(0.2, "colour jitter: brightness factor range 1 ± b (0: off)", range=PROBABILITY)
    contrast: float = option(0.2, "colour jitter: contrast factor range 1 ± c (0: off)", range=PROBABILITY)
    saturation: float = option(0.2, "colour jitter: saturation factor range 1 ± s (0: off)", range=PROBABILITY)
    hue: float = option(0.1, "colour jitter: hue shift in [-h, h] turns of the hue circle (0: off)", range="[0, 0.5]")
    brightness_shift: float = option(0.0, "add U(-b, b) to every normalised value of an image, after normalisation "
                                     "(the 2025 speed record's brightness; 0: off)", range=AT_LEAST_0)
    contrast_scale: float = option(0.0, "multiply an image's normalised values by U(1 - c, 1 + c), after the shift "
                                   "(the 2025 speed record's contrast; 0: off)", range=FRACTION)
    cutout_size: int = option(0, "side of a square set to black at a random place (0: off)", range="[0, 32]")
    mixup_prob: float = option(0.3, "probability that a batch is mixed with mixup", range=PROBABILITY)
    cutmix_prob: float = option(0.3, "probability that a batch is mixed with cutmix (exclusive with mixup)",
                                range=PROBABILITY)
    mixup_alpha: float = option(1.0, "Beta(α, α) of the mixup ratio (> 0 when mixup_prob > 0)", range=AT_LEAST_0)
    cutmix_alpha: float = option(1.0, "Beta(α, α) of the cutmix area (> 0 when cutmix_prob > 0)", range=AT_LEAST_0)


@dataclass
class ModelConfig:
    """`name` and `num_classes`, plus the chosen model's own keys in `options` (`model.<option>` in files and
    overrides), declared by the model at registration and resolved against the registry by `validate`."""

    name: str = option("attention_resnet", "registered model (`cifar-dist model-summary` lists them and their options)")
    num_classes: int = option(10, "number of outputs", range=AT_LEAST_1)
    options: dict = field(default_factory=dict, metadata={"model_options": True})


@dataclass
class MuonConfig:
    lr: float = option(0.24, "Muon's learning rate (the step of an orthogonalised update at schedule factor 1)",
                       range=AT_LEAST_0)
    momentum: float = option(0.6, "Muon's momentum (buffer = momentum · buffer + gradient)", range=FRACTION)
    nesterov: bool = option(True, "Nesterov momentum for Muon")
    ns_steps: int = option(3, "Newton–Schulz iterations that orthogonalise an update", range="[1, 20]")
    ns_coefficients: list = option([3.4445, -4.7750, 2.0315], "coefficients (a, b, c) of the quintic Newton–Schulz "
                                   "step X ← aX + (bA + cA²)X, A = XXᵀ",
                                   check=lambda v: None if len(v) == 3 else "three numbers (a, b, c)")
    weight_decay: float = option(0.0, "decoupled decay of the filters after each update: w ← w · (1 − lr · decay)",
                                 range=AT_LEAST_0)
    normalize_weights: bool = option(True, "rescale each filter tensor to norm √(output channels) before its update")
    normalize_every: int = option(1, "renormalise every this many Muon steps at the start of training", range=AT_LEAST_1)
    normalize_every_end: int = option(0, "… growing linearly to every this many steps at the end (0: no growth)",
                                      range=AT_LEAST_0)


@dataclass
class TrainConfig:
    epochs: float = option(500.0, "length of the run in epochs; a fraction ends mid-epoch (9.9)", range=ABOVE_0)
    global_batch_size: int = option(128, "images per optimizer step over all ranks and accumulation steps",
                                    range=AT_LEAST_1)
    optimizer: str = option("sgd", "sgd: SGD for every parameter; muon: Muon (train.muon.*) for the conv filters "
                            "(4-D weights), SGD for the rest", ("sgd", "muon"))
    lr: float = option(0.1, "peak learning rate of SGD, in the units of train.lr_units", range=AT_LEAST_0)
    lr_units: str = option("torch", "torch: lr and weight_decay as torch's SGD takes them; decoupled_per_1024: "
                           "the speed records' convention, per 1024 images and independent of momentum",
                           ("torch", "decoupled_per_1024"))
    loss_reduction: str = option("mean", "reduce the per-image losses of a batch by their mean or sum",
                                 ("mean", "sum"))
    momentum: float = option(0.9, "SGD momentum", range=FRACTION)
    nesterov: bool = option(True, "Nesterov momentum")
    weight_decay: float = option(5e-4, "L2 weight decay, in the units of train.lr_units", range=AT_LEAST_0)
    decay_norm_and_bias: bool = option(False, "also decay BatchNorm parameters and biases")
    bias_scaler: float = option(1.0, "learning-rate multiplier of BatchNorm biases (not of their weight decay)",
                                range=ABOVE_0)
    whiten_bias_scaler: float = option(1.0, "learning-rate multiplier of the whitening layer's bias (models with one)",
                                       range=ABOVE_0)
    muon: MuonConfig = field(default_factory=MuonConfig)
    schedule: str = option("cosine", "learning-rate schedule", ("cosine", "triangular"))
    warmup_epochs: float = option(5.0, "cosine: linear warm-up from lr_start_factor over this many epochs",
                                  range=AT_LEAST_0)
    lr_peak_fraction: float = option(0.2, "triangular: share of the steps spent rising to the peak (0: start at the "
                                     "peak and fall linearly from the first step)", range=FRACTION)
    lr_start_factor: float = option(0.0, "lr multiplier at the first step (warm-up start)", range=AT_LEAST_0)
    lr_end_factor: float = option(0.0, "lr multiplier at the last step", range=AT_LEAST_0)
    whiten_images: int = option(5000, "training images the whitening layer's filters are computed from (models "
                                "with one; airbench 5,000, the 2025 record 960)", range=AT_LEAST_1)
    whiten_bias_epochs: float = option(0.0, "freeze the whitening layer's bias after this many epochs (0: never)",
                                       range=AT_LEAST_0)
    whiten_bias_schedule: str = option("main", "main: until it freezes the whitening bias follows the schedule of the "
                                       "other groups; linear: its lr falls linearly from its peak to 0 at "
                                       "whiten_bias_epochs (airbench94_muon)", ("main", "linear"))
    label_smoothing: float = option(0.1, "label smoothing of the cross-entropy", range=FRACTION)
    grad_clip_norm: float = option(1.0, "clip the global gradient norm to this (0: off)", range=AT_LEAST_0)
    grad_accum_steps: int = option(1, "micro-batches accumulated per optimizer step", range=AT_LEAST_1)
    amp: bool = option(True, "mixed precision (autocast)")
    amp_dtype: str = option("auto", "auto: bf16 where supported, else fp16 with a gradient scaler",
                            ("auto", "bf16", "fp16"))
    channels_last: bool = option(True, "channels_last memory format for images and model")
    sync_bn: str = option("auto", "SyncBatchNorm; auto: on for CUDA with more than one rank", ("auto", "on", "off"))
    compile: bool = option(False, "torch.compile the DDP-wrapped model")
    compile_mode: str = option("default", "torch.compile mode", ("default", "reduce-overhead", "max-autotune",
                                                                "max-autotune-no-cudagraphs"))
    ema_decay: float = option(0.999, "EMA decay per optimizer step, also when ema_every > 1 (0: no EMA)",
                              range=FRACTION)
    ema_every: int = option(1, "update the EMA every this many optimizer steps", range=AT_LEAST_1)
    ema_ramp: str = option("none", "cubic: the decay of each update is multiplied by (step / total steps)³ "
                           "(airbench)", ("none", "cubic"))
    ema_start_epochs: float = option(0.0, "the EMA follows the model exactly for this many epochs", range=AT_LEAST_0)
    ema_lookahead: bool = option(False, "copy the EMA back into the model after each update and at the end "
                                 "(lookahead, speed-record style)")
    seed: int = option(0, "seed of the weights, data order and augmentation")
    deterministic: bool = option(False, "deterministic kernels: a resumed run ends bitwise like an uninterrupted one")
    resume: str = option("auto", "auto: continue from run.dir/last.pt when it exists; never; or a checkpoint path")
    checkpoint_interval_min: float = option(10.0, "also write last.pt every this many minutes (0: only per epoch)",
                                            range=AT_LEAST_0)
    max_nonfinite_steps: int = option(10, "stop (exit 3) after this many consecutive non-finite losses",
                                      range=AT_LEAST_1)
    max_steps: int = option(0, "stop after this many optimizer steps, with last.pt written (0: no limit)",
                            range=AT_LEAST_0)
    profile: str = option("", "'START:STOP' (quoted in YAML): profile the optimizer steps after step START up to "
                          "step STOP with torch.profiler: a Chrome/Perfetto trace and a table of the top operators "
                          "in run.dir/profile/ (rank 0; empty: off)", check=_step_window_problem)
    profile_all_ranks: bool = option(False, "train.profile on every rank, the files named per rank")
    tta: object = option(0, "test-time augmentation of the final evaluation: 0 none, 1 mirror, 2 mirror + ±1 px "
                         "translations (airbench), heavy: 2 + ±2 px translations", TTA_LEVELS)
    tta_average: str = option("logits", "what TTA averages over the views, in training and in evaluate/predict/"
                              "ensemble: the logits (the speed records) or the softmax probabilities",
                              ("logits", "probabilities"))
    tta_fraction: float = option(1.0, "share of the images that get TTA: the least confident by their plain top "
                                 "probability (the 2025 speed record: 0.25); the rest keep their plain logits",
                                 range="(0, 1]")
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
    tensorboard: bool = option(False, "also write each epoch's scalars as TensorBoard events in run.dir/tensorboard/ "
                               "(needs the tensorboard package: pip install -e .[tensorboard])")
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
    """(dotted key, value, `keys.Key`) of every leaf key under node, in declaration order; in the model
    section, the chosen model's own keys as they stand in its options."""
    for f in dataclasses.fields(node):
        value = getattr(node, f.name)
        if dataclasses.is_dataclass(value):
            yield from iter_keys(value, f"{prefix}{f.name}.")
        elif f.metadata.get("model_options"):
            declared = {key.name: key for key in _model_keys(node.name)}
            for name, option_value in value.items():
                if name in declared:
                    yield f"{prefix}{name}", option_value, declared[name]
        else:
            yield f"{prefix}{f.name}", value, f.metadata["key"]


def _model_keys(name: str) -> tuple[Key, ...]:
    """The keys a registered model declares (none for an unknown name: `validate` reports that)."""
    from cifar_dist.models.registry import MODELS  # imports the built-in models, and torch

    return MODELS[name].options if name in MODELS else ()


def _set_key(node, dotted_key: str, value, source: str, raw: str | None = None) -> None:
    root, parts = node, dotted_key.split(".")
    for depth, part in enumerate(parts):
        key_so_far = ".".join(parts[: depth + 1])
        names = [f.name for f in dataclasses.fields(node)]
        if isinstance(node, ModelConfig) and part not in names and depth == len(parts) - 1:
            # A model's own key: checked against the chosen model by `validate`, once the name is known.
            node.options[part] = (value, raw, source)
            return
        if part not in names or part == "options" and isinstance(node, ModelConfig):
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
        setattr(node, part, coerce(dotted_key, value, typing.get_origin(expected) or expected, raw))


def _apply_mapping(cfg: Config, mapping: dict, source: str) -> None:
    for key, value in mapping.items():
        _set_key(cfg, str(key), value, source)


def import_run_modules(cfg: Config) -> None:
    """Import run.imports (modules that register models of their own), naming any that fails."""
    for name in cfg.run.imports:
        try:
            importlib.import_module(name)
        except ImportError as err:
            raise ConfigError(f"run.imports: cannot import {name!r} ({err}); put its folder on PYTHONPATH") from None


def resolve_model_options(model: ModelConfig) -> None:
    """Check model.name against the registry and make model.options exactly the chosen model's keys:
    given values coerced and checked, the others at their defaults. A key that only other registered
    models declare is dropped (a recipe file may name keys of several models); one no model declares
    is an error."""
    from cifar_dist.models.registry import MODELS

    if model.name not in MODELS:
        raise ConfigError(f"config key 'model.name' must be one of {', '.join(sorted(MODELS))}; got {model.name!r} "
                          "(a model of your own: register it with @register_model in a module named in run.imports)")
    declared = {key.name: key for key in MODELS[model.name].options}
    known = {key.name for entry in MODELS.values() for key in entry.options}
    resolved = {}
    for name, given in model.options.items():
        value, raw, source = given if isinstance(given, tuple) else (given, None, "the config")
        if name in declared:
            resolved[name] = coerce(f"model.{name}", value, declared[name].value_type, raw)
        elif name not in known:
            hint = difflib.get_close_matches(name, [*known, "name", "num_classes"], n=1)
            raise ConfigError(f"unknown config key 'model.{name}' in {source}; model {model.name!r} has the keys "
                              f"{', '.join(['name', 'num_classes', *declared]) }"
                              f"{f'; did you mean model.{hint[0]}?' if hint else ''} (`cifar-dist model-summary` "
                              "lists every model's keys)")
    model.options = {name: resolved.get(name, key.default) for name, key in declared.items()}
    for name, key in declared.items():
        key.validate(f"model.{name}", model.options[name])


def validate(cfg: Config) -> None:
    """Each key against its declaration, the model section against the registry, then the rules between keys."""
    import_run_modules(cfg)
    resolve_model_options(cfg.model)
    for dotted, value, key in iter_keys(cfg):
        key.validate(dotted, value)
    a, t = cfg.augment, cfg.train
    if a.mixup_prob + a.cutmix_prob > 1.0:
        raise ConfigError("augment.mixup_prob + augment.cutmix_prob must be at most 1 (they are mutually "
                          f"exclusive); got {a.mixup_prob} + {a.cutmix_prob}")
    for kind in ("mixup", "cutmix"):
        if get_key(cfg, f"augment.{kind}_prob") > 0 and get_key(cfg, f"augment.{kind}_alpha") <= 0:
            raise ConfigError(f"config key 'augment.{kind}_alpha' must be > 0 when augment.{kind}_prob > 0")
    muon = t.muon
    if muon.normalize_every_end and muon.normalize_every_end < muon.normalize_every:
        raise ConfigError(f"train.muon.normalize_every_end={muon.normalize_every_end} must be 0 or at least "
                          f"train.muon.normalize_every={muon.normalize_every}")


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
        if path.is_dir():
            raise ConfigError(f"config file {path} is a folder; pass a YAML file (e.g. {path}/config.yaml)")
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


def with_absolute_paths(cfg: Config) -> Config:
    """cfg with its folder and file keys made absolute (data.root, data.beton_dir, run.dir, a train.resume
    path), so that the config a run saves works from any working directory."""
    def absolute(path: str) -> str:
        return str(Path(path).expanduser().resolve()) if path else path

    resume = cfg.train.resume if cfg.train.resume in ("auto", "never") else absolute(cfg.train.resume)
    return dataclasses.replace(
        cfg, data=dataclasses.replace(cfg.data, root=absolute(cfg.data.root), beton_dir=absolute(cfg.data.beton_dir)),
        run=dataclasses.replace(cfg.run, dir=absolute(cfg.run.dir)),
        train=dataclasses.replace(cfg.train, resume=resume))


def config_to_dict(cfg: Config) -> dict:
    """The config as plain data (YAML, checkpoints, wandb); a model's own keys sit beside name and num_classes."""
    data = dataclasses.asdict(cfg)
    data["model"] = {"name": cfg.model.name, "num_classes": cfg.model.num_classes, **cfg.model.options}
    return data


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
    for dotted, value, key in iter_keys(cfg):
        *sections, name = dotted.split(".")
        common = 0
        while common < min(len(sections), len(section_path)) and sections[common] == section_path[common]:
            common += 1
        for depth in range(common, len(sections)):
            lines.append(f"{'  ' * depth}{sections[depth]}:")
        section_path = sections
        text = yaml.safe_dump(value, default_flow_style=True, allow_unicode=True, width=10_000).strip()
        text = text.removesuffix("\n...").removesuffix("...").strip()
        lines.append(f"{'  ' * len(sections)}{name}: {text}  # {key.describe()}")
    return "\n".join(lines) + "\n"
