"""The model registry: `@register_model(name, options=(Key(...), ...), tiny={...})` on a builder function.

A builder takes `num_classes` and its declared options, by name. Each option is a `keys.Key` with
its name, default, description and allowed values: it becomes the config key `model.<name>`, checked
and described (`cifar-dist config`) like every other key, so a model registered from a module in
`run.imports` brings its own keys without touching `config.py`. A resume compares only the chosen
model's keys. `tiny` holds option values for a model small enough for quick benchmarks and tests.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from cifar_dist.keys import Key


@dataclass(frozen=True)
class ModelEntry:
    build: Callable
    options: tuple[Key, ...]
    description: str
    tiny: dict = field(default_factory=dict)

    @property
    def option_names(self) -> tuple[str, ...]:
        return tuple(key.name for key in self.options)


MODELS: dict[str, ModelEntry] = {}


def register_model(name: str, options: tuple[Key, ...] = (), tiny: dict | None = None):
    """Decorator: register `build(num_classes, **options)` under name (its docstring's first line describes it)."""
    unnamed = [key for key in options if not key.name]
    if unnamed:
        raise ValueError(f"register_model({name!r}): every option needs a name (Key(..., name='width'))")
    unknown = set(tiny or {}) - {key.name for key in options}
    if unknown:
        raise ValueError(f"register_model({name!r}): tiny sets {', '.join(sorted(unknown))}, which are not options")

    def decorate(build: Callable) -> Callable:
        description = (build.__doc__ or name).strip().splitlines()[0]
        MODELS[name] = ModelEntry(build, tuple(options), description, dict(tiny or {}))
        return build
    return decorate
