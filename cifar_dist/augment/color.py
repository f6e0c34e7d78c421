"""Colour ops on whole batches of float RGB images in [0, 1]: jitter and normalisation.

Jitter follows torchvision's ColorJitter per sample (same factor ranges, same blend formulas,
same grayscale weights), with two batch-friendly differences: the four adjustments run in a
fixed order (brightness, contrast, saturation, hue) instead of a random order per call, and
hue is shifted through a branch-free HSV round trip (hue rotation in HSV, as torchvision, not
the YIQ approximation).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
GRAYSCALE_WEIGHTS = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale (ITU-R 601-2 luma)


def to_float01(images_uint8: torch.Tensor) -> torch.Tensor:
    """uint8 images → float32 in [0, 1]."""
    return images_uint8.to(torch.float32).div_(255.0)


def channel_stats(device, mean: Sequence[float] = CIFAR10_MEAN, std: Sequence[float] = CIFAR10_STD):
    """Mean and std as (1, C, 1, 1) float32 tensors on device, to build once and reuse."""
    as_tensor = lambda values: torch.as_tensor(values, dtype=torch.float32, device=device).view(1, -1, 1, 1)
    return as_tensor(mean), as_tensor(std)


def normalize(images_float01: torch.Tensor, mean=CIFAR10_MEAN, std=CIFAR10_STD) -> torch.Tensor:
    """(x − mean) / std per channel; mean and std are sequences or tensors from `channel_stats`."""
    if not torch.is_tensor(mean) or not torch.is_tensor(std):
        mean, std = channel_stats(images_float01.device, mean, std)
    return (images_float01 - mean) / std


def _per_sample(factors: torch.Tensor) -> torch.Tensor:
    return factors.to(torch.float32).view(-1, 1, 1, 1)


def _blend(images: torch.Tensor, other: torch.Tensor, ratio: torch.Tensor) -> torch.Tensor:
    # ratio·images + (1 − ratio)·other as one lerp; ratio 1 returns the images exactly.
    return torch.lerp(other.expand_as(images), images, ratio).clamp_(0.0, 1.0)


def grayscale(images: torch.Tensor) -> torch.Tensor:
    """(N, 1, H, W) luma with torchvision's weights."""
    r, g, b = images.unbind(-3)
    return (GRAYSCALE_WEIGHTS[0] * r + GRAYSCALE_WEIGHTS[1] * g + GRAYSCALE_WEIGHTS[2] * b).unsqueeze(-3)


def adjust_brightness(images: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    return (images * _per_sample(factors)).clamp_(0.0, 1.0)


def adjust_contrast(images: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """Blend with each image's mean luma."""
    return _blend(images, grayscale(images).mean(dim=(-3, -2, -1), keepdim=True), _per_sample(factors))


def adjust_saturation(images: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """Blend with the image's luma: factor 0 gives grayscale, 1 the image itself."""
    return _blend(images, grayscale(images), _per_sample(factors))


def adjust_hue(images: torch.Tensor, shifts: torch.Tensor) -> torch.Tensor:
    """Rotate the HSV hue by shifts (N,) in turns, in [-0.5, 0.5]; saturation and value kept.

    Back to RGB with the closed form channel_n = V − C·clamp(min(k, 4 − k), 0, 1),
    k = (n + 6·hue) mod 6, n = 5, 3, 1 for R, G, B (C = max − min, the chroma).
    """
    r, g, b = images.unbind(-3)
    value = images.amax(-3)
    chroma = value - images.amin(-3)
    inverse_chroma = torch.where(chroma > 0, chroma, torch.ones_like(chroma)).reciprocal_()
    # Hue in sixths of a turn, wrapped once into [0, 6); then k = hue6 + n lies in [1, 11).
    red_max, green_max = value == r, value == g
    numerator = torch.where(red_max, g - b, torch.where(green_max, b - r, r - g))
    sector = torch.where(red_max, 0.0, torch.where(green_max, 2.0, 4.0))
    sector = sector + 6.0 * shifts.to(torch.float32).view(-1, 1, 1)
    hue6 = torch.remainder(torch.addcmul(sector, numerator, inverse_chroma), 6.0)
    offsets = (5.0 - 2.0 * torch.arange(3, device=images.device)).view(1, 3, 1, 1)  # R, G, B: 5, 3, 1
    k = hue6.unsqueeze(-3) + offsets
    k = torch.where(k >= 6.0, k - 6.0, k)
    ramp = torch.minimum(k, 4.0 - k).clamp_(0.0, 1.0)
    return value.unsqueeze(-3) - chroma.unsqueeze(-3) * ramp


def color_jitter(
    images: torch.Tensor,
    brightness_factors: Optional[torch.Tensor] = None,
    contrast_factors: Optional[torch.Tensor] = None,
    saturation_factors: Optional[torch.Tensor] = None,
    hue_factors: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Brightness, contrast, saturation, then hue, each per sample; a None factor skips that step."""
    if brightness_factors is not None:
        images = adjust_brightness(images, brightness_factors)
    if contrast_factors is not None:
        images = adjust_contrast(images, contrast_factors)
    if saturation_factors is not None:
        images = adjust_saturation(images, saturation_factors)
    if hue_factors is not None:
        images = adjust_hue(images, hue_factors)
    return images


def random_jitter_factors(
    batch_size: int,
    brightness: float,
    contrast: float,
    saturation: float,
    hue: float,
    generator: torch.Generator,
) -> tuple[Optional[torch.Tensor], ...]:
    """Per-sample factors with ColorJitter's ranges: uniform in [max(0, 1 − s), 1 + s] for
    brightness, contrast and saturation, uniform in [−hue, hue] for hue; None where the strength is 0."""
    if not 0.0 <= hue <= 0.5:
        raise ValueError(f"augment.hue must be in [0, 0.5] (a fraction of a turn of the hue circle); got {hue}")

    def uniform(low: float, high: float) -> torch.Tensor:
        return low + (high - low) * torch.rand(batch_size, generator=generator, device=generator.device)

    strengths = (brightness, contrast, saturation)
    scaled = [uniform(max(0.0, 1.0 - s), 1.0 + s) if s > 0 else None for s in strengths]
    return (*scaled, uniform(-hue, hue) if hue > 0 else None)
