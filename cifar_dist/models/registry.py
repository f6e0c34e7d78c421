"""The model registry: `@register_model(name, options=(...))` on a builder function.

A builder takes `num_classes` and the options it declares, by name; the options are keys of the
`model` config section. Declaring them lets a resume compare only what the chosen model uses,
and `cifar-dist model-summary` list each model with its options.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from torch import nn


@dataclass(frozen=True)
class ModelEntry:
    build: Callable[..., nn.Module]
    options: tuple[str, ...]
    description: str


MODELS: dict[str, ModelEntry] = {}


def register_model(name: str, options: tuple[str, ...] = ()):
    """Decorator: register `build(num_classes, **options)` under name."""
    def decorate(build: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        description = (build.__doc__ or name).strip().splitlines()[0]
        MODELS[name] = ModelEntry(build, tuple(options), description)
        return build
    return decorate
