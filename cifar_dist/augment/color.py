"""Colour ops on whole batches of float RGB images in [0, 1]: jitter and normalisation.

Jitter draws ColorJitter's per-sample factors (same ranges) and applies brightness, contrast,
saturation and hue, in that fixed order, as ONE affine colour map per image, x ↦ clamp(A·x + t,
0, 1): the four steps compose into a (N, 3, 4) map [A | t] on tiny tensors, and the images pass
through one batched matmul and one clamp. Against torchvision's ColorJitter, by design:
- a fixed order instead of a random order per call;
- one clamp at the end instead of one after each step (only then do the steps compose into one
  affine map); contrast blends with the mean luma of the unclipped image. With the default
  strengths (0.2 each) on CIFAR-10 training images this moves a channel by 0.0005 on average
  (0.016 at the 99th percentile), where bright pixels would have clipped;
- hue is a rotation of RGB space about the gray axis by 2π·shift, not an HSV round trip: it
  keeps the mean of R, G, B and the chroma's length where HSV keeps max and min, and it is
  linear where HSV is not. On CIFAR-10 training images with shifts uniform in ±0.1 turn, the
  HSV hue angle lands within 0.003 turn (1°) of torchvision's on average (0.006 at the 99th
  percentile; pixels with chroma > 0.1), while value and saturation differ by about 0.02;
  per channel that is 0.011 on average from torchvision's `adjust_hue` (0.07 at the 99th
  percentile, 0.19 at most, on saturated pixels), against 0.014 for the HSV shift itself.
  Shifts of ±1/3 turn cycle the channels exactly as HSV does.
One step alone is torchvision's step within float rounding (brightness, contrast, saturation);
a zero strength skips its step, and no step at all returns the input.
`jitter_and_normalize` also folds the division by 255 and the normalisation into the same map.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

from cifar_dist.cifar10 import CHANNEL_MEAN, CHANNEL_STD

GRAYSCALE_WEIGHTS = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale (ITU-R 601-2 luma)


def to_float01(images_uint8: torch.Tensor) -> torch.Tensor:
    """uint8 images → float32 in [0, 1], in the same memory format."""
    return images_uint8.to(torch.float32).div_(255.0)


def channel_stats(device, mean: Sequence[float] = CHANNEL_MEAN, std: Sequence[float] = CHANNEL_STD):
    """Mean and std as (1, C, 1, 1) float32 tensors on device, to build once and reuse."""
    as_tensor = lambda values: torch.as_tensor(values, dtype=torch.float32, device=device).view(1, -1, 1, 1)
    return as_tensor(mean), as_tensor(std)


def normalize(images_float01: torch.Tensor, mean=CHANNEL_MEAN, std=CHANNEL_STD) -> torch.Tensor:
    """(x − mean) / std per channel; mean and std are sequences or tensors from `channel_stats`."""
    if not torch.is_tensor(mean) or not torch.is_tensor(std):
        mean, std = channel_stats(images_float01.device, mean, std)
    return (images_float01 - mean) / std


def _luma(rgb: torch.Tensor, dim: int) -> torch.Tensor:
    # Weights as Python floats: a weights tensor on the GPU would cost a host-to-device copy per call.
    r, g, b = rgb.unbind(dim)
    return GRAYSCALE_WEIGHTS[0] * r + GRAYSCALE_WEIGHTS[1] * g + GRAYSCALE_WEIGHTS[2] * b


def jitter_affine(
    channel_means: torch.Tensor,
    brightness_factors: Optional[torch.Tensor] = None,
    contrast_factors: Optional[torch.Tensor] = None,
    saturation_factors: Optional[torch.Tensor] = None,
    hue_shifts: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """(N, 3, 4) maps [A | t], A·x + t = brightness, contrast, saturation, then hue of x, unclamped.

    channel_means: (N, 3) mean R, G, B of each input image; contrast blends with the mean luma
    of its own input, which the map so far carries along (the mean of A·x + t is A·mean + t).
    Each step acts on the map so far, x ↦ A·x + t, through its rows (output channels): brightness
    and contrast scale them, saturation blends them with their luma, hue rotates its columns.
    """
    n, device = channel_means.shape[0], channel_means.device
    affine = torch.eye(3, 4, device=device).expand(n, 3, 4)
    per_sample = lambda factors: factors.to(torch.float32).view(-1, 1, 1)
    if brightness_factors is not None:
        affine = affine * per_sample(brightness_factors)
    if contrast_factors is not None:
        c = per_sample(contrast_factors)
        means = torch.cat([channel_means, torch.ones_like(channel_means[:, :1])], dim=1).unsqueeze(-1)
        mean_luma = _luma(affine @ means, dim=1).unsqueeze(-1)  # (N, 1, 1)
        affine = affine * c
        affine = torch.cat([affine[..., :3], torch.addcmul(affine[..., 3:], 1.0 - c, mean_luma)], dim=-1)
    if saturation_factors is not None:
        # s·v + (1 − s)·luma(v)·(1, 1, 1) for every column v.
        affine = torch.lerp(_luma(affine, dim=1).unsqueeze(1), affine, per_sample(saturation_factors))
    if hue_shifts is not None:
        affine = _rotate_about_gray(affine, hue_shifts)
    return affine


def _rotate_about_gray(columns: torch.Tensor, shifts: torch.Tensor) -> torch.Tensor:
    """Rotate each column v of columns (N, 3, K) about k = (1, 1, 1)/√3 by 2π·shift (Rodrigues):
    cos·v + sin·(k × v) + (1 − cos)·(k·v)·k; R → G → B for a positive shift, as HSV hue."""
    angles = shifts.to(torch.float32).view(-1, 1, 1) * (2.0 * math.pi)
    cos, sin = torch.cos(angles), torch.sin(angles)
    cross = (columns.roll(1, dims=1) - columns.roll(-1, dims=1)) * (1.0 / math.sqrt(3.0))  # k × v
    along_gray = columns.mean(dim=1, keepdim=True)  # (k·v)·k has this in every channel
    return cos * columns + sin * cross + (1.0 - cos) * along_gray


def _apply_affine(images: torch.Tensor, affine: torch.Tensor) -> torch.Tensor:
    """A·x + t at every pixel of every image, [A | t] = affine (N, 3, 4): one batched matmul, NCHW out."""
    n, c, h, w = images.shape
    return torch.baddbmm(affine[..., 3:], affine[..., :3], images.reshape(n, c, h * w)).view(n, c, h, w)


def color_jitter(
    images: torch.Tensor,
    brightness_factors: Optional[torch.Tensor] = None,
    contrast_factors: Optional[torch.Tensor] = None,
    saturation_factors: Optional[torch.Tensor] = None,
    hue_shifts: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Brightness, contrast, saturation, then hue, per sample, as one affine map and one clamp.

    images: (N, 3, H, W) in [0, 1]; a None factor skips that step; all None returns images itself.
    """
    factors = (brightness_factors, contrast_factors, saturation_factors, hue_shifts)
    if all(f is None for f in factors):
        return images
    affine = jitter_affine(images.mean(dim=(-2, -1)), *factors)
    return _apply_affine(images, affine).clamp_(0.0, 1.0)


def jitter_and_normalize(
    images: torch.Tensor,
    factors: Sequence[Optional[torch.Tensor]],
    mean: torch.Tensor,
    std: torch.Tensor,
    input_max: float = 255.0,
) -> torch.Tensor:
    """`normalize(color_jitter(images / input_max, *factors), mean, std)` in one pass.

    The scaling and the normalisation are affine too, so they join the jitter's map; the clamp to
    [0, 1] becomes a clamp to each channel's normalised image of [0, 1], the same thing because
    normalising is increasing. images: (N, 3, H, W) floats in [0, input_max], e.g. the raw bytes
    as float; mean, std: (1, 3, 1, 1) tensors from `channel_stats`. Returns NCHW.
    """
    mean, std = mean.view(1, -1, 1), std.view(1, -1, 1)  # per output channel: per row of the map
    affine = jitter_affine(images.mean(dim=(-2, -1)) / input_max, *factors)
    scale = torch.cat([torch.full_like(mean, 1.0 / input_max).expand(1, 3, 3), torch.ones_like(mean)], dim=-1)
    affine = torch.cat([affine[..., :3], affine[..., 3:] - mean], dim=-1) * scale / std
    out = _apply_affine(images, affine)
    low, high = (-mean / std).unsqueeze(-1), ((1.0 - mean) / std).unsqueeze(-1)
    return torch.minimum(torch.maximum(out, low, out=out), high, out=out)


def shift_and_scale(images: torch.Tensor, shift: float, scale: float, generator: torch.Generator) -> torch.Tensor:
    """(x + s)·c per image on normalised values, s ~ U(−shift, shift), c ~ U(1 − scale, 1 + scale): the 2025
    speed record's brightness and contrast, which move the normalised values rather than the pixels."""
    n, device = images.shape[0], images.device
    s = (torch.rand(n, 1, 1, 1, generator=generator, device=device) * 2 - 1) * shift
    c = (torch.rand(n, 1, 1, 1, generator=generator, device=device) * 2 - 1) * scale + 1
    return (images + s) * c


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
    def uniform(low: float, high: float) -> torch.Tensor:
        return low + (high - low) * torch.rand(batch_size, generator=generator, device=generator.device)

    strengths = (brightness, contrast, saturation)
    scaled = [uniform(max(0.0, 1.0 - s), 1.0 + s) if s > 0 else None for s in strengths]
    return (*scaled, uniform(-hue, hue) if hue > 0 else None)
