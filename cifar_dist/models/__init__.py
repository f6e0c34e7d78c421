"""Models by name: `build_model(cfg)` and the keys each model declares.

Every model takes normalized float images N x 3 x 32 x 32 (contiguous or channels_last) and
returns logits N x num_classes. A model with a data-dependent whitening layer names it `whiten`
and implements `init_from_data(images)` (normalized training images), which the run assembly calls
before wrapping the model in DDP, so rank 0's result is what every rank starts from.
Importing this package registers the built-in models.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from torch import nn

from cifar_dist.models.registry import MODELS, ModelEntry, register_model
from cifar_dist.models import attention_resnet, fast, resnet  # noqa: F401  (they register themselves)

if TYPE_CHECKING:
    from cifar_dist.config import ModelConfig

__all__ = ["MODELS", "build_model", "model_identity", "register_model"]


def model_identity(model: "ModelConfig | dict") -> dict:
    """What identifies a model, for comparing a checkpoint with a config: its name, num_classes and the
    values of the keys it declares (a saved config may also hold other models' keys: they are ignored)."""
    values = model if isinstance(model, dict) else {"name": model.name, "num_classes": model.num_classes,
                                                    **model.options}
    entry: ModelEntry = MODELS.get(values["name"]) or ModelEntry(None, (), "")
    options = {key.name: values.get(key.name, key.default) for key in entry.options}
    return {"name": values["name"], "num_classes": values["num_classes"], **options}


def build_model(cfg) -> nn.Module:
    """Build the model cfg (a `config.ModelConfig`) names, on the CPU in float32; its keys are resolved first."""
    from cifar_dist.config import resolve_model_options

    resolve_model_options(cfg)
    return MODELS[cfg.name].build(num_classes=cfg.num_classes, **cfg.options)
