"""Geometric ops on whole batches: translate (= random crop), flip, rotate, perspective, cutout.

Each op takes explicit per-sample parameters; a `random_*` companion draws them from a
`torch.Generator` on the images' device. Rotation and perspective are both a per-sample 3×3
matrix that maps an output point to the input point it samples, in `grid_sample`'s normalised
coordinates (align_corners=False: the image spans [-1, 1], pixel j's centre is (2j+1)/W − 1);
composing them costs one resampling.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def translate(
    images: torch.Tensor, shifts_xy: torch.Tensor, padding: int, flip_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Shift each image by whole pixels, filling by reflection.

    Equals slicing `F.pad(images, (p, p, p, p), mode="reflect")` at rows p+dy … p+dy+H−1 and
    columns p+dx … p+dx+W−1, i.e. a random crop of the reflect-padded image.
    shifts_xy: (N, 2) integer (dx, dy), each in [-padding, padding], padding < min(H, W).
    flip_mask: (N,) bool; those samples are also mirrored, in the same gather, as
    `flip(translate(images, shifts_xy, padding), flip_mask)`.
    One gather from the unpadded images, in any memory format; returns contiguous NCHW.
    """
    n, c, h, w = images.shape
    device = images.device
    shifts = shifts_xy.to(device=device, dtype=torch.long)
    columns = torch.arange(w, device=device).expand(n, w)
    if flip_mask is not None:
        columns = torch.where(flip_mask.view(-1, 1), columns.flip(-1), columns)
    rows = _reflect(shifts[:, 1:2] + torch.arange(h, device=device), h)  # (N, H)
    cols = _reflect(shifts[:, 0:1] + columns, w)  # (N, W)
    pixel_index = (rows[:, :, None] * w + cols[:, None, :]).view(n, 1, h * w).expand(n, c, h * w)
    # flatten(2) is a view for NCHW and for channels_last alike; the gather writes NCHW.
    return images.flatten(2).gather(2, pixel_index).view(n, c, h, w)


def _reflect(index: torch.Tensor, size: int) -> torch.Tensor:
    """Indices in [-(size − 1), 2·(size − 1)] mirrored into [0, size) about the first and last
    pixel, the edge not repeated (F.pad's "reflect")."""
    index = index.abs()
    return torch.where(index >= size, 2 * (size - 1) - index, index)


def random_shifts(batch_size: int, padding: int, generator: torch.Generator) -> torch.Tensor:
    """(N, 2) integer shifts (dx, dy), uniform in [-padding, padding]."""
    return torch.randint(-padding, padding + 1, (batch_size, 2), generator=generator, device=generator.device)


def flip(images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mirror left–right the images where mask (N,) is True."""
    return torch.where(mask.view(-1, 1, 1, 1), images.flip(-1), images)


def random_flip_mask(batch_size: int, generator: torch.Generator, p: float = 0.5) -> torch.Tensor:
    """(N,) bool, each True with probability p."""
    return torch.rand(batch_size, generator=generator, device=generator.device) < p


def image_hash_weights(num_values: int, seed: int, device) -> torch.Tensor:
    """Integer weights for `stable_image_bits`, drawn on the CPU so every device agrees."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 2**31, (num_values,), generator=generator, dtype=torch.long).to(device)


def stable_image_bits(images_uint8: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """(N,) bool: a pseudo-random bit per image that depends only on its pixels and the weights.

    The weighted sum of the raw bytes is exact in int64 (< 2**51), so an image gets the same
    bit whatever batch, position, epoch or device it comes in; bit 30 of the sum is close to
    uniform because each term is uniform below 2**31.
    """
    flat = images_uint8.reshape(images_uint8.shape[0], -1).long()
    return ((flat * weights).sum(1) >> 30) & 1 == 1


def alternating_flip_mask(stable_bits: torch.Tensor, epoch: int) -> torch.Tensor:
    """Flip the images whose stable bit is set on even epochs, the others on odd epochs."""
    return stable_bits ^ bool(epoch % 2)


def rotation_matrices(angles_deg: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(N, 3, 3) output→input maps rotating about the image centre, counter-clockwise for angle > 0.

    torchvision's convention: with y pointing down, output point p samples input R·p where
    R = [[cos, -sin], [sin, cos]]; the aspect ratio enters because the normalised axes differ.
    """
    radians = angles_deg.to(torch.float32) * (math.pi / 180.0)
    cos, sin = torch.cos(radians), torch.sin(radians)
    matrices = torch.eye(3, device=angles_deg.device).expand(angles_deg.shape[0], 3, 3).clone()
    matrices[:, 0, 0] = cos
    matrices[:, 0, 1] = -sin * (height / width)
    matrices[:, 1, 0] = sin * (width / height)
    matrices[:, 1, 1] = cos
    return matrices


def perspective_matrices(
    startpoints: torch.Tensor, endpoints: torch.Tensor, height: int, width: int
) -> torch.Tensor:
    """(N, 3, 3) homographies that move startpoints to endpoints (output→input maps).

    Points are (N, 4, 2) pixel coordinates (x, y) as in torchvision's `perspective`
    (corners [0, 0], [W−1, 0], [W−1, H−1], [0, H−1]). Solved in normalised coordinates, where
    the 8×8 systems are well conditioned in float32; `solve_ex` skips the singularity check
    that would stall a GPU.
    """
    start, end = startpoints.to(torch.float32), endpoints.to(torch.float32)
    u, v = start[..., 0] * (2.0 / width) - 1.0, start[..., 1] * (2.0 / height) - 1.0  # input points
    x, y = end[..., 0] * (2.0 / width) - 1.0, end[..., 1] * (2.0 / height) - 1.0  # output points
    ones, zeros = torch.ones_like(x), torch.zeros_like(x)
    rows_u = torch.stack([x, y, ones, zeros, zeros, zeros, -u * x, -u * y], dim=-1)
    rows_v = torch.stack([zeros, zeros, zeros, x, y, ones, -v * x, -v * y], dim=-1)
    system = torch.stack([rows_u, rows_v], dim=2).reshape(-1, 8, 8)
    rhs = torch.stack([u, v], dim=2).reshape(-1, 8, 1)
    coeffs, _ = torch.linalg.solve_ex(system, rhs)
    return torch.cat([coeffs.squeeze(-1), torch.ones_like(coeffs[:, :1, 0])], dim=1).view(-1, 3, 3)


def warp(images: torch.Tensor, matrices: torch.Tensor) -> torch.Tensor:
    """Resample each image through its output→input matrix; bilinear, zero outside."""
    n, _, h, w = images.shape
    device = images.device
    xs = (torch.arange(w, device=device, dtype=torch.float32) * 2 + 1) / w - 1
    ys = (torch.arange(h, device=device, dtype=torch.float32) * 2 + 1) / h - 1
    # M·(x, y, 1)ᵀ over the pixel grid is an outer sum, column 0 of M times x plus columns 1, 2
    # times (y, 1): one pass, where a matmul against the (3, H·W) grid costs several. Planes
    # (N, 3, H, W) keep every elementwise op on long contiguous rows.
    matrices = matrices.to(torch.float32)
    along_x = matrices[:, :, 0:1] * xs  # (N, 3, W)
    along_y = torch.addcmul(matrices[:, :, 2:3], matrices[:, :, 1:2], ys)  # (N, 3, H)
    mapped = along_y.unsqueeze(-1) + along_x.unsqueeze(-2)  # (N, 3, H, W)
    grid = mapped[:, :2].div_(mapped[:, 2:]).permute(0, 2, 3, 1)  # (N, H, W, 2), a strided view
    return F.grid_sample(
        images, grid.to(images.dtype), mode="bilinear", padding_mode="zeros", align_corners=False
    )


def rotate(images: torch.Tensor, angles_deg: torch.Tensor) -> torch.Tensor:
    """Rotate each image by its angle (degrees, counter-clockwise), bilinear, fill 0."""
    return warp(images, rotation_matrices(angles_deg, images.shape[-2], images.shape[-1]))


def perspective(images: torch.Tensor, startpoints: torch.Tensor, endpoints: torch.Tensor) -> torch.Tensor:
    """torchvision `perspective` per sample: (N, 4, 2) startpoints move to endpoints; fill 0."""
    return warp(images, perspective_matrices(startpoints, endpoints, images.shape[-2], images.shape[-1]))


def random_angles(batch_size: int, degrees: float, generator: torch.Generator) -> torch.Tensor:
    """(N,) angles uniform in [-degrees, degrees]."""
    uniform = torch.rand(batch_size, generator=generator, device=generator.device)
    return (uniform * 2 - 1) * degrees


def corner_points(batch_size: int, height: int, width: int, device) -> torch.Tensor:
    """(N, 4, 2) corners in torchvision's order: top-left, top-right, bottom-right, bottom-left."""
    right, bottom = _corner_sides(device)
    return torch.stack([right * (width - 1), bottom * (height - 1)], dim=-1).expand(batch_size, 4, 2).clone()


def _corner_sides(device) -> tuple[torch.Tensor, torch.Tensor]:
    # Built with arange rather than torch.tensor(list): a host-to-device copy would wait for the GPU.
    index = torch.arange(4, device=device)
    return ((index == 1) | (index == 2)).long(), (index >= 2).long()


def random_perspective_points(
    batch_size: int, height: int, width: int, distortion_scale: float, prob: float, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """torchvision RandomPerspective parameters per sample: (startpoints, endpoints, applied).

    Each corner moves inward by a whole number of pixels, uniform in
    0 … int(distortion_scale · half-size) on each axis; samples not applied (probability
    1 − prob) keep endpoints == startpoints.
    """
    device = generator.device
    max_dx, max_dy = int(distortion_scale * (width // 2)), int(distortion_scale * (height // 2))
    applied = torch.rand(batch_size, generator=generator, device=device) < prob
    inward = torch.stack(
        [
            torch.randint(0, max_dx + 1, (batch_size, 4), generator=generator, device=device),
            torch.randint(0, max_dy + 1, (batch_size, 4), generator=generator, device=device),
        ],
        dim=-1,
    )
    right, bottom = _corner_sides(device)
    direction = torch.stack([1 - 2 * right, 1 - 2 * bottom], dim=-1)  # points inward from each corner
    startpoints = corner_points(batch_size, height, width, device)
    endpoints = startpoints + inward * direction * applied.view(-1, 1, 1)
    return startpoints, endpoints, applied


def cutout(
    images: torch.Tensor, centres_xy: torch.Tensor, size: int, fill: float | torch.Tensor = 0.0
) -> torch.Tensor:
    """Fill a size×size square per image, starting at centre − size//2, clipped at the border.

    fill: a number, or a tensor broadcastable to (N, C, 1, 1) (e.g. the normalised image of black).
    """
    h, w = images.shape[-2:]
    start = centres_xy.to(device=images.device, dtype=torch.long) - size // 2  # (N, 2)
    rows = torch.arange(h, device=images.device) - start[:, 1:2]  # (N, H)
    cols = torch.arange(w, device=images.device) - start[:, 0:1]  # (N, W)
    inside = ((rows >= 0) & (rows < size))[:, :, None] & ((cols >= 0) & (cols < size))[:, None, :]
    if torch.is_tensor(fill):
        return torch.where(inside[:, None], fill.to(images.dtype), images)
    return images.masked_fill(inside[:, None], fill)


def random_cutout(
    images: torch.Tensor, size: int, generator: torch.Generator, fill: float | torch.Tensor = 0.0
) -> torch.Tensor:
    """Cutout with the centre uniform over the image (so the square may fall partly outside)."""
    n, _, h, w = images.shape
    centres = torch.stack(
        [
            torch.randint(0, w, (n,), generator=generator, device=generator.device),
            torch.randint(0, h, (n,), generator=generator, device=generator.device),
        ],
        dim=1,
    )
    return cutout(images, centres, size, fill)
