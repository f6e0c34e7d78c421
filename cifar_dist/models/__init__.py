"""Model registry: `build_model(cfg)` by `cfg.name`, data-dependent init, and wrapper stripping.

Every model takes normalized float images N x 3 x 32 x 32 (contiguous or channels_last) and
returns logits N x num_classes.
"""
from __future__ import annotations

import torch
from torch import nn

from cifar_dist.config import ModelConfig
from cifar_dist.models import attention_resnet, fast, resnet

BUILDERS = {
    "attention_resnet": attention_resnet.build,
    "fast": fast.build,
    "resnet18": resnet.build,
}


def build_model(cfg: ModelConfig) -> nn.Module:
    """Build the model named cfg.name, on the CPU in float32."""
    if cfg.name not in BUILDERS:
        raise ValueError(f"unknown model '{cfg.name}'; set model.name to one of: {', '.join(BUILDERS)}")
    return BUILDERS[cfg.name](cfg)


def unwrap(model: nn.Module) -> nn.Module:
    """Strip DistributedDataParallel (.module) and torch.compile (._orig_mod) wrappers, in any nesting."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def init_from_data(model: nn.Module, images: torch.Tensor) -> None:
    """Let a model set data-dependent weights (the fast net's whitening conv) from normalized training images.

    Call it before DDP wrapping so the broadcast from rank 0 carries the result; models without
    such weights ignore it.
    """
    bare = unwrap(model)
    if hasattr(bare, "init_from_data"):
        bare.init_from_data(images)
