"""The reference model: a ResNet whose blocks apply channel then spatial attention (CBAM-style).

At the defaults (width 31, 10 classes) it has 4,913,705 trainable parameters.
"""
from __future__ import annotations

import torch
from torch import nn

from cifar_dist.keys import Key
from cifar_dist.models.registry import register_model
from cifar_dist.models.resnet import BasicBlock, conv_bn, kaiming_init

STAGE_MULTIPLIERS = (2, 4, 8, 8)  # stage widths as multiples of the stem width
STAGE_STRIDES = (1, 2, 2, 1)


def attention_hidden_channels(channels: int) -> int:
    """Width of the channel-attention MLP: C // r with reduction r = max(C // 16, 4)."""
    reduction = max(channels // 16, 4)
    return max(channels // reduction, 1)


class ChannelAttention(nn.Module):
    """Rescale channels by the sum of sigmoid(MLP(avg-pool)) and sigmoid(MLP(max-pool))."""

    def __init__(self, channels: int):
        super().__init__()
        hidden = attention_hidden_channels(channels)
        self.mlp = nn.Sequential(
            nn.Conv2d(channels, hidden, 1, bias=False),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, channels, 1, bias=False),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        avg = torch.sigmoid(self.mlp(x.mean(dim=(2, 3), keepdim=True)))
        peak = torch.sigmoid(self.mlp(x.amax(dim=(2, 3), keepdim=True)))
        return x * (avg + peak)


class SpatialAttention(nn.Module):
    """Rescale positions by sigmoid(7x7 conv of the channel-wise mean and max)."""

    def __init__(self, kernel_size: int = 7):
        super().__init__()
        self.conv = nn.Conv2d(2, 1, kernel_size, padding=kernel_size // 2, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = torch.cat([x.mean(dim=1, keepdim=True), x.amax(dim=1, keepdim=True)], dim=1)
        return x * torch.sigmoid(self.conv(pooled))


def attention_block(in_channels: int, out_channels: int, stride: int) -> BasicBlock:
    """Basic residual block with channel and spatial attention at the end of the residual branch."""
    return BasicBlock(in_channels, out_channels, stride, ChannelAttention(out_channels), SpatialAttention())


class AttentionResNet(nn.Module):
    """Stem, four stages of two attention blocks, 1x1 conv head, average pool, dropout, linear."""

    def __init__(self, width: int = 31, num_classes: int = 10, dropout: float = 0.3):
        super().__init__()
        self.stem = nn.Sequential(conv_bn(3, width, 3), nn.ReLU(inplace=True))
        blocks, in_channels = [], width
        for multiplier, stride in zip(STAGE_MULTIPLIERS, STAGE_STRIDES):
            out_channels = width * multiplier
            blocks += [attention_block(in_channels, out_channels, stride), attention_block(out_channels, out_channels, 1)]
            in_channels = out_channels
        self.stages = nn.Sequential(*blocks)
        self.head = nn.Sequential(conv_bn(in_channels, in_channels, 1), nn.ReLU(inplace=True))
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(in_channels, num_classes)
        kaiming_init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.head(self.stages(self.stem(x)))
        return self.fc(self.dropout(x.mean(dim=(2, 3))))


@register_model("attention_resnet", options=(
    Key(31, "attention_resnet: stem width; stages are 2/4/8/8 × width", range="[1, inf)", name="width"),
    Key(0.3, "attention_resnet: dropout before the classifier", range="[0, 1)", name="dropout"),
), tiny={"width": 4})
def build(num_classes: int, width: int, dropout: float) -> AttentionResNet:
    """The reference project's ResNet with channel + spatial attention (4,913,705 parameters at width 31)."""
    return AttentionResNet(width, num_classes, dropout)
