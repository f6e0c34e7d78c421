"""Distributed evaluation: every image counted once, sums all-reduced across ranks; TTA views."""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from cifar_dist.engine.distributed import all_reduce_

TTA_LEVELS = (0, 1, 2, "heavy")


def tta_views(images: torch.Tensor, level: int | str) -> list[tuple[float, torch.Tensor]]:
    """(weight, view) pairs of test-time augmentation; the weights sum to 1.

    0: the image. 1: the image and its mirror, ½ each. 2 (airbench): those two weighted ½ in all,
    plus the image shifted one pixel up-left and one down-right (reflect padding) and their
    mirrors, weighted ½ in all: ¼, ¼, ⅛, ⅛, ⅛, ⅛. "heavy": level 2's six views weighted ¾ in all,
    plus the image shifted two pixels up, down, left and right and their mirrors, 1/32 each.
    Views keep the input's memory format.
    """
    if level not in TTA_LEVELS:
        raise ValueError(f"TTA level must be one of {', '.join(map(str, TTA_LEVELS))}; got {level!r}")
    if level == 0:
        return [(1.0, images)]
    memory_format = torch.channels_last if images.is_contiguous(memory_format=torch.channels_last) \
        else torch.contiguous_format
    mirrored = [(0.5, images), (0.5, images.flip(-1).contiguous(memory_format=memory_format))]
    if level == 1:
        return mirrored
    padded = F.pad(images, (1, 1, 1, 1), mode="reflect")
    views = [(weight / 2, view) for weight, view in mirrored]
    for shifted in (padded[..., :-2, :-2], padded[..., 2:, 2:]):
        shifted = shifted.contiguous(memory_format=memory_format)
        views += [(0.125, shifted), (0.125, shifted.flip(-1).contiguous(memory_format=memory_format))]
    if level == 2:
        return views
    views = [(weight * 0.75, view) for weight, view in views]
    padded = F.pad(images, (2, 2, 2, 2), mode="reflect")
    for shifted in (padded[..., 4:, 2:-2], padded[..., :-4, 2:-2], padded[..., 2:-2, 4:], padded[..., 2:-2, :-4]):
        shifted = shifted.contiguous(memory_format=memory_format)
        views += [(1 / 32, shifted), (1 / 32, shifted.flip(-1).contiguous(memory_format=memory_format))]
    return views


def tta_logits(model: nn.Module, images: torch.Tensor, level: int | str) -> torch.Tensor:
    """Weighted mean of the logits of the TTA views (the speed records average logits)."""
    return sum(weight * model(view).float() for weight, view in tta_views(images, level))


@torch.no_grad()
def evaluate(model: nn.Module, loader, transform, num_classes: int, autocast=contextlib.nullcontext,
             tta_level: int = 0) -> dict:
    """Loss, top-1 accuracy, count and confusion matrix (rows: true class) over the whole split."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)
    for images, labels in loader:
        inputs = transform(images)
        with autocast():
            logits = tta_logits(model, inputs, tta_level)
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
