"""Batched, on-device augmentation: geometric ops, colour ops, mixup/cutmix, and the pipeline."""
from .color import CIFAR10_MEAN, CIFAR10_STD, normalize
from .mix import MIX_KINDS, mix_batch, soft_target_cross_entropy
from .pipeline import EvalTransform, TrainAugment, make_generator

__all__ = [
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "EvalTransform",
    "MIX_KINDS",
    "TrainAugment",
    "make_generator",
    "mix_batch",
    "normalize",
    "soft_target_cross_entropy",
]
