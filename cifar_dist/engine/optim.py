"""SGD over parameter groups and the learning-rate schedule, from the train section of the config.

Two ways to state lr and weight decay (train.lr_units):
- `torch`: as torch's SGD takes them, applied to the gradient of the reduced loss.
- `decoupled_per_1024` (the speed records', after airbench94): lr is the step per 1024 images with
  the momentum's amplification of a steady gradient, 1 + 1/(1 − m) with Nesterov (1/(1 − m)
  without), divided out, so momentum and batch size can change without re-tuning it; weight_decay
  is the decay per 1024 images per step, whatever the lr. SGD gets lr / (1024 · amplification) for
  a summed loss (times the global batch for a mean loss: the same steps either way).
In both, each group's weight_decay is the decay per step divided by the group's own lr, so a
group whose lr is scaled (BatchNorm biases, train.bias_scaler) keeps the same decay per step.
"""
from __future__ import annotations

import functools
import math

import torch
from torch import nn

from cifar_dist.config import TrainConfig
from cifar_dist.errors import ConfigError


def sgd_rates(tc: TrainConfig, global_batch_size: int) -> tuple[float, float]:
    """(lr SGD applies to the gradient of the reduced loss, weight decay per step) at schedule factor 1."""
    if tc.lr_units == "torch":
        return tc.lr, tc.lr * tc.weight_decay
    amplification = (1 + 1 / (1 - tc.momentum)) if tc.nesterov else 1 / (1 - tc.momentum)
    kilostep = 1024 * amplification
    lr_on_sum = tc.lr / kilostep
    lr = lr_on_sum if tc.loss_reduction == "sum" else lr_on_sum * global_batch_size
    return lr, tc.weight_decay * global_batch_size / kilostep


def parameter_groups(model: nn.Module, lr: float, decay_per_step: float, bias_scaler: float,
                     decay_norm_and_bias: bool) -> list[dict]:
    """Named SGD groups: `weights`; `norm_bias` (BatchNorm biases, lr × bias_scaler); `whiten_bias`
    (a model's whitening-layer bias, which the schedule can freeze); `other` (BN weights, biases).

    Weights are always decayed; the rest only with decay_norm_and_bias (airbench decays all).
    """
    norm_biases = {id(m.bias) for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
                   and m.bias is not None}
    whiten = getattr(model, "whiten", None)
    whiten_bias = id(whiten.bias) if whiten is not None and whiten.bias is not None else None
    members = {"weights": [], "norm_bias": [], "whiten_bias": [], "other": []}
    for param in model.parameters():
        if not param.requires_grad:
            continue
        if id(param) == whiten_bias:
            members["whiten_bias"].append(param)
        elif id(param) in norm_biases:
            members["norm_bias"].append(param)
        else:
            members["weights" if param.ndim > 1 else "other"].append(param)
    groups = []
    for name, params in members.items():
        if not params:
            continue
        group_lr = lr * (bias_scaler if name == "norm_bias" else 1.0)
        decayed = name == "weights" or decay_norm_and_bias
        groups.append({"name": name, "params": params, "lr": group_lr,
                       "weight_decay": decay_per_step / group_lr if decayed and group_lr > 0 else 0.0})
    return groups


def lr_factor(step: int, total_steps: int, schedule: str, warmup_steps: int, peak_fraction: float,
              start_factor: float, end_factor: float, freeze_step: int | None = None) -> float:
    """Multiplier of a group's lr at optimizer step `step` (0-based).

    triangular (airbench): linear from start_factor at step 0 to 1 at int(peak_fraction · total),
    then linear to end_factor at the last step. cosine: linear warm-up from start_factor to 1 over
    warmup_steps, then a half cosine down to end_factor. From freeze_step on, 0 (a frozen group).
    """
    if freeze_step is not None and step >= freeze_step:
        return 0.0
    if schedule == "triangular":
        peak = max(1, int(peak_fraction * total_steps))
        if step < peak:
            return start_factor + (1 - start_factor) * step / peak
        return 1 + (end_factor - 1) * min(1.0, (step - peak) / max(1, total_steps - peak))
    if step < warmup_steps:
        return start_factor + (1 - start_factor) * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return end_factor + (1 - end_factor) * 0.5 * (1 + math.cos(math.pi * progress))


def build_optimizer(model: nn.Module, tc: TrainConfig, global_batch_size: int, steps_per_epoch: int,
                    total_steps: int):
    """(SGD, LambdaLR) for the bare model; raises ConfigError for a freeze without a whitening layer."""
    lr, decay_per_step = sgd_rates(tc, global_batch_size)
    groups = parameter_groups(model, lr, decay_per_step, tc.bias_scaler, tc.decay_norm_and_bias)
    if tc.whiten_bias_epochs > 0 and not any(g["name"] == "whiten_bias" for g in groups):
        raise ConfigError("train.whiten_bias_epochs applies to models with a whitening layer (model.name=fast); "
                          "this model has none: set train.whiten_bias_epochs=0")
    optimizer = torch.optim.SGD(groups, lr=lr, momentum=tc.momentum, nesterov=tc.nesterov and tc.momentum > 0)
    schedule = functools.partial(
        lr_factor, total_steps=total_steps, schedule=tc.schedule,
        warmup_steps=int(tc.warmup_epochs * steps_per_epoch), peak_fraction=tc.lr_peak_fraction,
        start_factor=tc.lr_start_factor, end_factor=tc.lr_end_factor)
    freeze_step = round(tc.whiten_bias_epochs * steps_per_epoch) if tc.whiten_bias_epochs > 0 else None
    factors = [functools.partial(schedule, freeze_step=freeze_step) if g["name"] == "whiten_bias" else schedule
               for g in groups]
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factors)
