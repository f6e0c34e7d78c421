"""The augmentation stage of the batch path: uint8 batch on device → normalised float + soft targets.

Order: translate (random crop, reflect fill) and flip, exact byte moves done on uint8 in one
gather; to float; rotate and perspective (one resampling, zero fill); colour jitter and
normalisation (one affine map per image, see `color`); cutout (normalised black); mixup or
cutmix; channels_last. The whole batch goes through each step at once; the slow steps on a CPU
are the resampling and the memory traffic, so the path keeps few batch-sized buffers.
Every random draw comes from one generator made by `make_generator(seed, rank, epoch, step)`,
in a fixed order, so a (seed, rank, epoch, step) tuple gives bitwise the same batch.
An op whose strength is 0 in the config is skipped, not run at strength 0.
"""
from __future__ import annotations

import hashlib
import struct

import torch

from cifar_dist.config import AugmentConfig

from . import color, geometric, mix



def make_generator(seed: int, rank: int, epoch: int, step: int, device) -> torch.Generator:
    """A generator on device whose seed is a 63-bit BLAKE2b hash of (seed, rank, epoch, step)."""
    digest = hashlib.blake2b(struct.pack("<4q", seed, rank, epoch, step), digest_size=8).digest()
    return torch.Generator(device=device).manual_seed(int.from_bytes(digest, "little") & (2**63 - 1))


def _check_batch(images_uint8: torch.Tensor, generator: torch.Generator | None = None) -> None:
    if images_uint8.dtype != torch.uint8 or images_uint8.dim() != 4 or images_uint8.shape[1] != 3:
        raise ValueError(
            "augmentation expects a uint8 batch of RGB images shaped (N, 3, H, W); got "
            f"{images_uint8.dtype} {tuple(images_uint8.shape)} — pass the loader's raw uint8 batch"
        )
    if generator is not None and generator.device.type != images_uint8.device.type:
        raise ValueError(
            f"the generator lives on {generator.device} but the images on {images_uint8.device}; "
            "make it with make_generator(..., device=images.device)"
        )


def _finish(images: torch.Tensor, channels_last: bool) -> torch.Tensor:
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    return images.contiguous(memory_format=memory_format)


class EvalTransform:
    """uint8 batch → normalised float32, no randomness."""

    def __init__(self, channels_last: bool = True):
        self.channels_last = channels_last
        self._stats = {}

    def __call__(self, images_uint8: torch.Tensor) -> torch.Tensor:
        _check_batch(images_uint8)
        device = images_uint8.device
        if device not in self._stats:
            self._stats[device] = color.channel_stats(device)
        images = color.normalize(color.to_float01(images_uint8), *self._stats[device])
        return _finish(images, self.channels_last)


class TrainAugment:
    """Training augmentation of whole batches on their device, driven by a seeded generator.

    flip="alternating" (the speed-record variant) flips an image on even epochs when a bit
    hashed from its pixels (with `seed`) is set, and on odd epochs when it is not: each image
    alternates between flipped and not, whatever the shuffling, batch or rank it arrives in.
    The hash weights come from a generator seeded with `seed` alone, independent of epoch.
    """

    def __init__(self, cfg: AugmentConfig, num_classes: int = 10, channels_last: bool = True, seed: int = 0):
        self.cfg = cfg
        self.num_classes = num_classes
        self.channels_last = channels_last
        self.seed = seed
        self._stats = {}
        self._hash_weights = {}

    def _flip_mask(self, images_uint8: torch.Tensor, generator: torch.Generator, epoch: int):
        if self.cfg.flip == "random":
            return geometric.random_flip_mask(images_uint8.shape[0], generator)
        if self.cfg.flip == "alternating":
            key = (images_uint8.device, images_uint8[0].numel())
            if key not in self._hash_weights:
                self._hash_weights[key] = geometric.image_hash_weights(key[1], self.seed, key[0])
            bits = geometric.stable_image_bits(images_uint8, self._hash_weights[key])
            return geometric.alternating_flip_mask(bits, epoch)
        return None

    def _warp(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        cfg = self.cfg
        n, _, h, w = images.shape
        rotating = cfg.rotate_degrees > 0
        distorting = cfg.perspective_prob > 0 and cfg.perspective_distortion > 0
        if not rotating and not distorting:
            return images
        matrices = None
        if rotating:
            angles = geometric.random_angles(n, cfg.rotate_degrees, generator)
            matrices = geometric.rotation_matrices(angles, h, w)
        if distorting:
            start, end, applied = geometric.random_perspective_points(
                n, h, w, cfg.perspective_distortion, cfg.perspective_prob, generator
            )
            homographies = geometric.perspective_matrices(start, end, h, w)
            # Rotation first, then perspective: output point p samples the input at R·P·p.
            matrices = homographies if matrices is None else matrices @ homographies
        warped = geometric.warp(images, matrices)
        if rotating:
            return warped
        # Only perspective: samples it was not applied to keep their exact pixels.
        return torch.where(applied.view(-1, 1, 1, 1), warped, images)

    def __call__(
        self, images_uint8: torch.Tensor, labels: torch.Tensor, generator: torch.Generator, epoch: int = 0
    ):
        """Returns (normalised float32 images, soft targets (N, num_classes))."""
        _check_batch(images_uint8, generator)
        cfg = self.cfg
        n, _, h, w = images_uint8.shape
        flip_mask = self._flip_mask(images_uint8, generator, epoch)
        # Crop and flip only move bytes: one gather on uint8 (a quarter of the traffic of float, the
        # same result as after the conversion), which also turns the loaders' channels_last bytes
        # into NCHW, the layout where resampling and the colour matmul run fastest.
        if cfg.crop_padding > 0 or flip_mask is not None:
            if cfg.crop_padding > 0:
                shifts = geometric.random_shifts(n, cfg.crop_padding, generator)
            else:
                shifts = torch.zeros(n, 2, dtype=torch.long, device=images_uint8.device)
            images_uint8 = geometric.translate(images_uint8, shifts, cfg.crop_padding, flip_mask)
        images_uint8 = images_uint8.contiguous()

        device = images_uint8.device
        if device not in self._stats:
            self._stats[device] = color.channel_stats(device)
        mean, std = self._stats[device]
        jittering = any(strength > 0 for strength in (cfg.brightness, cfg.contrast, cfg.saturation, cfg.hue))
        # With jitter, the division by 255 joins the jitter's and the normalisation's affine map;
        # without, conversion and normalisation are EvalTransform's, bit for bit.
        images = images_uint8.to(torch.float32) if jittering else color.to_float01(images_uint8)
        images = self._warp(images, generator)
        factors = color.random_jitter_factors(
            n, cfg.brightness, cfg.contrast, cfg.saturation, cfg.hue, generator
        )
        if jittering:
            images = color.jitter_and_normalize(images, factors, mean, std, input_max=255.0)
        else:
            images = color.normalize(images, mean, std)
        if cfg.brightness_shift > 0 or cfg.contrast_scale > 0:
            images = color.shift_and_scale(images, cfg.brightness_shift, cfg.contrast_scale, generator)
        if cfg.cutout_size > 0:
            black = color.normalize(torch.zeros_like(mean), mean, std)  # cutout fills with black, normalised
            images = geometric.random_cutout(images, cfg.cutout_size, generator, fill=black)
        images, targets, _ = mix.mix_batch(
            images, labels, self.num_classes,
            cfg.mixup_prob, cfg.cutmix_prob, cfg.mixup_alpha, cfg.cutmix_alpha, generator,
        )
        return _finish(images, self.channels_last), targets
