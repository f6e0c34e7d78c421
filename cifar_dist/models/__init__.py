"""Models by name: `build_model(cfg)` and the options each model declares.

Every model takes normalized float images N x 3 x 32 x 32 (contiguous or channels_last) and
returns logits N x num_classes. A model with a data-dependent whitening layer names it `whiten`
and implements `init_from_data(images)` (normalized training images), which the run assembly calls
before wrapping the model in DDP, so rank 0's result is what every rank starts from.
"""
from __future__ import annotations

from torch import nn

from cifar_dist.config import ModelConfig
from cifar_dist.errors import ConfigError
from cifar_dist.models.registry import MODELS, ModelEntry, register_model
from cifar_dist.models import attention_resnet, fast, resnet  # noqa: F401  (they register themselves)

__all__ = ["MODELS", "build_model", "model_entry", "model_options", "register_model"]


def model_entry(name: str) -> ModelEntry:
    if name not in MODELS:
        raise ConfigError(f"config key 'model.name' must be one of {', '.join(sorted(MODELS))}; got {name!r}")
    return MODELS[name]


def model_options(cfg: ModelConfig | dict) -> dict:
    """What identifies the model: its name, num_classes and the options it declares."""
    values = cfg if isinstance(cfg, dict) else vars(cfg)
    entry = model_entry(values["name"])
    return {key: values[key] for key in ("name", "num_classes", *entry.options)}


def build_model(cfg: ModelConfig) -> nn.Module:
    """Build the model named cfg.name, on the CPU in float32; a bad option is a ConfigError."""
    options = model_options(cfg)
    del options["name"]
    try:
        return model_entry(cfg.name).build(**options)
    except ValueError as err:  # an option out of range, named by the builder
        raise ConfigError(str(err)) from None
