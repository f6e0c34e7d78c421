"""Distributed evaluation: every image counted once, sums all-reduced across ranks; test-time augmentation.

TTA has one rule, for the trainer and every command (evaluate, predict, ensemble): `tta_output`
takes the weighted mean of the views' logits or of their softmax (`train.tta_average`), for every
image or only the least confident share of each batch (`train.tta_fraction`).
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from cifar_dist.config import TTA_LEVELS
from cifar_dist.engine.distributed import all_reduce_
from cifar_dist.metrics import confusion_matrix

NLL_FLOOR = 1e-12  # probability floor of the loss, so that one certain mistake does not make it infinite


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


def tta_output(model: nn.Module, images: torch.Tensor, level: int | str, average: str = "logits",
               fraction: float = 1.0) -> torch.Tensor:
    """float32 logits (average="logits": the weighted mean of the views' logits, as the speed records) or
    probabilities (average="probabilities": the weighted mean of the views' softmax) of normalised images.

    fraction < 1: only that share of the batch, the images whose plain top probability is lowest, get
    the views (the 2025 speed record's selective TTA); the others keep their plain output.
    """
    def reduce(batch: torch.Tensor) -> torch.Tensor:
        total = 0
        for weight, view in tta_views(batch, level):
            output = model(view).float()
            total = total + weight * (torch.softmax(output, dim=1) if average == "probabilities" else output)
        return total

    if level == 0 or fraction >= 1.0:
        return reduce(images)
    plain = model(images).float()
    chosen = int(len(images) * fraction)
    output = torch.softmax(plain, dim=1) if average == "probabilities" else plain
    if chosen == 0:
        return output
    least_confident = torch.softmax(plain, dim=1).amax(dim=1).topk(chosen, largest=False).indices
    return output.index_copy(0, least_confident, reduce(images[least_confident]))


@torch.no_grad()
def score_split(model: nn.Module, loader, transform, num_classes: int, autocast=contextlib.nullcontext,
                tta_level: int | str = 0, tta_average: str = "logits", tta_fraction: float = 1.0) -> dict:
    """Loss, top-1 accuracy, count and confusion matrix (rows: true class) over the whole split, of the
    output `tta_output` gives (with averaged probabilities, the loss is their negative log-likelihood)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)
    for images, labels in loader:
        inputs = transform(images)
        with autocast():
            output = tta_output(model, inputs, tta_level, tta_average, tta_fraction)
        if tta_average == "probabilities":
            loss_sum += F.nll_loss(output.clamp_min(NLL_FLOOR).log(), labels, reduction="sum").double()
        else:
            loss_sum += F.cross_entropy(output, labels, reduction="sum").double()
        confusion += confusion_matrix(labels, output.argmax(dim=1), num_classes)
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
