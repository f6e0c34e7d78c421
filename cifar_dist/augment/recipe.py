"""The augmentation recipe, described once, and how it splits between host and device.

`AugmentConfig` is the recipe. The device path (`pipeline.TrainAugment`) runs all of it on whole
batches. The `torchvision` loader runs the per-image part on the host with PIL in its worker
processes (the reference project's way, our baseline): the ops in `HOST_OPS`, which leaves
`device_part(cfg)` for the device: normalisation, cutout and mixup/cutmix. A setting neither
path can honour for a loader is refused by `check_loader_support` before anything starts.
"""
from __future__ import annotations

import dataclasses

from cifar_dist.config import AugmentConfig
from cifar_dist.errors import ConfigError

# The recipe keys the host path applies, with the value that switches each off on the device.
HOST_OPS = {
    "crop_padding": 0, "flip": "none", "rotate_degrees": 0.0, "perspective_prob": 0.0,
    "brightness": 0.0, "contrast": 0.0, "saturation": 0.0, "hue": 0.0,
}
HOST_AUGMENTED_LOADERS = ("torchvision",)


def check_loader_support(cfg: AugmentConfig, loader: str) -> None:
    """Refuse a recipe setting that the loader's path cannot honour, naming both."""
    if loader in HOST_AUGMENTED_LOADERS and cfg.flip == "alternating":
        raise ConfigError(
            f"augment.flip=alternating is not available with data.loader={loader}: its per-image PIL "
            "workers do not know the epoch and image identity the alternation needs; use augment.flip=random "
            "or data.loader=gpu or ffcv")


def device_part(cfg: AugmentConfig, loader: str) -> AugmentConfig:
    """What the device runs of the recipe when the loader is `loader`."""
    if loader not in HOST_AUGMENTED_LOADERS:
        return cfg
    return dataclasses.replace(cfg, **HOST_OPS)


def host_transforms(cfg: AugmentConfig):
    """The per-image PIL transforms of HOST_OPS (torchvision), in the reference project's order."""
    from torchvision import transforms as T

    steps = []
    if cfg.crop_padding:
        steps.append(T.RandomCrop(32, padding=cfg.crop_padding, padding_mode="reflect"))
    if cfg.flip == "random":
        steps.append(T.RandomHorizontalFlip())
    if cfg.rotate_degrees:
        steps.append(T.RandomRotation(cfg.rotate_degrees))
    if any((cfg.brightness, cfg.contrast, cfg.saturation, cfg.hue)):
        steps.append(T.ColorJitter(cfg.brightness, cfg.contrast, cfg.saturation, cfg.hue))
    if cfg.perspective_distortion and cfg.perspective_prob:
        steps.append(T.RandomPerspective(cfg.perspective_distortion, p=cfg.perspective_prob))
    return T.Compose(steps)
