"""The fast net of the CIFAR-10 speed records (after Keller Jordan's airbench94).

A frozen 2x2 patch-whitening conv, GELU, three conv groups (conv, max-pool, BN, act, conv, BN, act;
act GELU, or SiLU as the 2025 record), a global max-pool and a bias-free linear classifier whose logits
are scaled by model.scale. The whitening weights come from training images: call `init_from_data`
before training.
"""
from __future__ import annotations

import torch
from torch import nn

from cifar_dist.keys import Key
from cifar_dist.models.registry import register_model

WHITEN_KERNEL = 2
WHITEN_CHANNELS = 2 * 3 * WHITEN_KERNEL**2  # every eigen-direction of a 2x2x3 patch and its negative
BN_EPS = 1e-12  # airbench's value: the frozen BN scale makes a larger eps a needless bias
WHITEN_EPS = 5e-4  # added to the eigenvalues so that near-null directions are not blown up
ACTIVATIONS = {"gelu": nn.GELU, "silu": nn.SiLU}


def frozen_scale_bn(channels: int, bn_momentum: float) -> nn.BatchNorm2d:
    """BatchNorm whose scale stays 1 (only the bias trains).

    bn_momentum follows airbench's convention: it is the weight of the old running statistics,
    so torch's momentum (the weight of the new batch) is 1 - bn_momentum.
    """
    norm = nn.BatchNorm2d(channels, eps=BN_EPS, momentum=1.0 - bn_momentum)
    norm.weight.requires_grad_(False)  # a plain BatchNorm2d, so convert_sync_batchnorm keeps this
    return norm


def dirac_conv(in_channels: int, out_channels: int) -> nn.Conv2d:
    """3x3 'same' conv whose first in_channels filters start as the identity (an implicit residual)."""
    conv = nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False)
    with torch.no_grad():
        nn.init.dirac_(conv.weight[:in_channels])
    return conv


class ConvGroup(nn.Module):
    """conv -> max-pool 2 -> BN -> act -> conv -> BN -> act."""

    def __init__(self, in_channels: int, out_channels: int, bn_momentum: float, activation: str = "gelu"):
        super().__init__()
        self.conv1 = dirac_conv(in_channels, out_channels)
        self.pool = nn.MaxPool2d(2)
        self.norm1 = frozen_scale_bn(out_channels, bn_momentum)
        self.conv2 = dirac_conv(out_channels, out_channels)
        self.norm2 = frozen_scale_bn(out_channels, bn_momentum)
        self.activation = ACTIVATIONS[activation]()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.activation(self.norm1(self.pool(self.conv1(x))))
        return self.activation(self.norm2(self.conv2(x)))


class WhiteningConv(nn.Conv2d):
    """The whitening conv, computed in float32 even under autocast.

    Its weakest directions are small differences of neighbouring pixels, scaled up by ~1/sqrt(eps):
    with its input rounded to bf16 (8-bit mantissa) the weakest two keep ~5% rounding noise, with
    fp16 (airbench's precision) ~1%, in float32 none. The layer is 0.1% of the net's FLOPs.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):
            return super().forward(x.float())


class FastNet(nn.Module):
    """Whitening conv, three conv groups, global max-pool, scaled linear classifier."""

    def __init__(self, widths=(64, 256, 256), num_classes: int = 10, bn_momentum: float = 0.6,
                 scale: float = 1 / 9, activation: str = "gelu", head_init_std: float = 0.0):
        super().__init__()
        # Frozen weight (set by init_from_data); the bias trains, as in airbench, where the
        # trainer may freeze it after a few epochs.
        self.whiten = WhiteningConv(3, WHITEN_CHANNELS, WHITEN_KERNEL, padding=0, bias=True)
        self.whiten.weight.requires_grad_(False)
        nn.init.zeros_(self.whiten.bias)
        self.activation = nn.GELU()
        groups, in_channels = [], WHITEN_CHANNELS
        for width in widths:
            groups.append(ConvGroup(in_channels, width, bn_momentum, activation))
            in_channels = width
        self.groups = nn.Sequential(*groups)
        self.fc = nn.Linear(in_channels, num_classes, bias=False)
        if head_init_std > 0:  # airbench94_muon: unit-std head weights, logits scaled by 1/width instead
            with torch.no_grad():
                self.fc.weight.mul_(head_init_std / self.fc.weight.std())
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.groups(self.activation(self.whiten(x)))
        return self.fc(x.amax(dim=(2, 3))) * self.scale

    @torch.no_grad()
    def init_from_data(self, images: torch.Tensor, eps: float = WHITEN_EPS) -> None:
        """Set the whitening filters from the 2x2 patch covariance of normalized images (N x 3 x H x W)."""
        weight = self.whiten.weight
        eigenvalues, eigenvectors = patch_eigenbasis(images.to(weight.device), WHITEN_KERNEL)
        filters = eigenvectors.T / torch.sqrt(eigenvalues + eps)[:, None]  # rows: directions, largest first
        filters = filters.reshape(-1, 3, WHITEN_KERNEL, WHITEN_KERNEL)
        # The negated copies let the GELU after this layer pass both signs of every direction.
        weight.copy_(torch.cat([filters, -filters]).to(weight.dtype))


def patch_eigenbasis(images: torch.Tensor, kernel: int, chunk: int = 1000) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues (descending) and eigenvectors (columns) of the covariance of all kernel x kernel patches."""
    # Patches are flattened in conv-weight order (channel, row, column). Sums are accumulated in
    # float64 over chunks so that 50,000 images never need all their patches in memory at once.
    dim = images.shape[1] * kernel * kernel
    total = torch.zeros(dim, dtype=torch.float64, device=images.device)
    outer = torch.zeros(dim, dim, dtype=torch.float64, device=images.device)
    count = 0
    for start in range(0, len(images), chunk):
        batch = images[start:start + chunk].double()
        patches = batch.unfold(2, kernel, 1).unfold(3, kernel, 1)  # N, C, H', W', k, k
        patches = patches.permute(0, 2, 3, 1, 4, 5).reshape(-1, dim)
        total += patches.sum(dim=0)
        outer += patches.T @ patches
        count += len(patches)
    mean = total / count
    covariance = outer / count - torch.outer(mean, mean)
    eigenvalues, eigenvectors = torch.linalg.eigh(covariance)
    return eigenvalues.flip(0).float(), eigenvectors.flip(1).float()


def _three_positive_integers(widths: list) -> str | None:
    if len(widths) == 3 and all(isinstance(w, int) and not isinstance(w, bool) and w >= 1 for w in widths):
        return None
    return "three positive integers (block1, block2, block3)"


@register_model("fast", options=(
    Key([64, 256, 256], "fast: channels of its three conv groups", check=_three_positive_integers, name="widths"),
    Key(0.6, "fast: weight of the old BN statistics (airbench's convention)", range="[0, 1)", name="bn_momentum"),
    Key(1 / 9, "fast: multiplier of the classifier's logits", range="(0, inf)", name="scale"),
    Key("gelu", "fast: activation of the conv groups (the one after the whitening conv stays GELU)",
        choices=tuple(ACTIVATIONS), name="activation"),
    Key(0.0, "fast: rescale the classifier's initial weights to this std (airbench94_muon: 1; 0: torch's init)",
        range="[0, inf)", name="head_init_std"),
), tiny={"widths": [8, 16, 16]})
def build(num_classes: int, widths: list, bn_momentum: float, scale: float, activation: str,
          head_init_std: float) -> FastNet:
    """airbench-style net: whitening conv, three conv groups, scaled linear head (speed records)."""
    return FastNet(tuple(widths), num_classes, bn_momentum, scale, activation, head_init_std)
