"""The standard CIFAR ResNet-18: 3x3 stem, no max-pool, BasicBlocks [2, 2, 2, 2] of 64/128/256/512."""
from __future__ import annotations

import torch
from torch import nn

from cifar_dist.models.registry import register_model

STAGE_WIDTHS = (64, 128, 256, 512)
STAGE_STRIDES = (1, 2, 2, 2)


def conv_bn(in_channels: int, out_channels: int, kernel_size: int, stride: int = 1) -> nn.Sequential:
    """A bias-free conv followed by BatchNorm (the conv bias would be cancelled by the BN mean)."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding=kernel_size // 2, bias=False),
        nn.BatchNorm2d(out_channels),
    )


def shortcut(in_channels: int, out_channels: int, stride: int) -> nn.Module:
    """Identity where the shape is kept, else a strided 1x1 conv + BN projection."""
    if stride == 1 and in_channels == out_channels:
        return nn.Identity()
    return conv_bn(in_channels, out_channels, kernel_size=1, stride=stride)


def kaiming_init(model: nn.Module) -> None:
    """Kaiming normal (fan_out, relu) for convs, BN weight 1 and bias 0, as torchvision's ResNets do."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with a residual connection; `extra` modules end the residual branch."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, *extra: nn.Module):
        super().__init__()
        self.residual = nn.Sequential(
            conv_bn(in_channels, out_channels, 3, stride),
            nn.ReLU(inplace=True),
            conv_bn(out_channels, out_channels, 3),
            *extra,
        )
        self.shortcut = shortcut(in_channels, out_channels, stride)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.residual(x) + self.shortcut(x))


class ResNet18(nn.Module):
    """ResNet-18 for 32x32 inputs (He et al. 2016, CIFAR variant)."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(conv_bn(3, STAGE_WIDTHS[0], 3), nn.ReLU(inplace=True))
        blocks, in_channels = [], STAGE_WIDTHS[0]
        for width, stride in zip(STAGE_WIDTHS, STAGE_STRIDES):
            blocks += [BasicBlock(in_channels, width, stride), BasicBlock(width, width, 1)]
            in_channels = width
        self.stages = nn.Sequential(*blocks)
        self.fc = nn.Linear(in_channels, num_classes)
        kaiming_init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stages(self.stem(x))
        return self.fc(x.mean(dim=(2, 3)))


@register_model("resnet18")
def build(num_classes: int) -> ResNet18:
    """The standard CIFAR ResNet-18 (11,173,962 parameters)."""
    return ResNet18(num_classes)
