"""Distributed evaluation: every image counted once, sums all-reduced across ranks."""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from cifar_dist.engine.distributed import all_reduce_


def tta_logits(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Flip + translate test-time augmentation (speed-record style): mean of weighted views."""
    flipped = images.flip(-1)
    logits = 0.25 * (model(images) + model(flipped))
    padded = F.pad(images, (1, 1, 1, 1), mode="reflect")
    for view in (padded[..., :-2, :-2], padded[..., 2:, 2:]):  # shifted by one pixel either way
        view = view.contiguous(memory_format=torch.channels_last)
        logits = logits + 0.125 * (model(view) + model(view.flip(-1)))
    return logits


@torch.no_grad()
def evaluate(model: nn.Module, loader, transform, num_classes: int, autocast=contextlib.nullcontext,
             tta: bool = False) -> dict:
    """Loss, top-1 accuracy, count and confusion matrix (rows: true class) over the whole split."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)
    for images, labels in loader:
        inputs = transform(images)
        with autocast():
            logits = tta_logits(model, inputs) if tta else model(inputs)
        logits = logits.float()
        loss_sum += F.cross_entropy(logits, labels, reduction="sum").double()
        predictions = logits.argmax(dim=1)
        confusion += torch.bincount(labels * num_classes + predictions,
                                    minlength=num_classes * num_classes).view(num_classes, num_classes)
    all_reduce_(loss_sum)
    all_reduce_(confusion)
    model.train(was_training)
    count = int(confusion.sum())
    correct = int(confusion.diagonal().sum())
    per_class = (confusion.diagonal().double() / confusion.sum(dim=1).clamp(min=1)).tolist()
    return {
        "loss": float(loss_sum) / max(count, 1),
        "acc": correct / max(count, 1),
        "count": count,
        "per_class_acc": per_class,
        "confusion": confusion.cpu().tolist(),
    }
