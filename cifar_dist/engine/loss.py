"""The training loss: cross-entropy against the soft targets that mixup and cutmix produce."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def soft_target_cross_entropy(
    logits: torch.Tensor, soft_targets: torch.Tensor, label_smoothing: float = 0.0, reduction: str = "mean"
) -> torch.Tensor:
    """Cross-entropy against soft targets smoothed as t·(1 − ε) + ε/C, in float32; reduction mean, sum
    or none (one loss per image).

    For one-hot targets it equals `F.cross_entropy(logits, labels, label_smoothing=ε, reduction=...)`.
    """
    log_probs = F.log_softmax(logits.float(), dim=-1)
    targets = soft_targets.float()
    if label_smoothing > 0:
        targets = targets * (1.0 - label_smoothing) + label_smoothing / logits.shape[-1]
    losses = -(targets * log_probs).sum(dim=-1)
    if reduction == "none":
        return losses
    return losses.sum() if reduction == "sum" else losses.mean()
