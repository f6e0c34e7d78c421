"""The optimizer over parameter groups and the learning-rate schedule, from the train section of the config.

train.optimizer=sgd: torch's SGD for every group. train.optimizer=muon: the conv filters (every trainable
4-D weight) in one Muon group (`engine.muon`, lr train.muon.lr), the other groups on SGD as below, all
in one optimizer under one schedule (airbench94_muon).

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
from cifar_dist.engine.muon import Muon
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


def conv_filters(model: nn.Module) -> list[nn.Parameter]:
    """The trainable 4-D weights: what Muon updates."""
    return [p for p in model.parameters() if p.requires_grad and p.ndim == 4]


def parameter_groups(model: nn.Module, lr: float, decay_per_step: float, bias_scaler: float,
                     decay_norm_and_bias: bool, whiten_bias_scaler: float = 1.0, exclude=()) -> list[dict]:
    """Named SGD groups: `weights`; `norm_bias` (BatchNorm biases, lr × bias_scaler); `whiten_bias`
    (a model's whitening-layer bias, lr × whiten_bias_scaler, which the schedule can freeze); `other`
    (BN weights, biases). Parameters in `exclude` (Muon's) are left out.

    Weights are always decayed; the rest only with decay_norm_and_bias (airbench decays all).
    """
    norm_biases = {id(m.bias) for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
                   and m.bias is not None}
    whiten = getattr(model, "whiten", None)
    whiten_bias = id(whiten.bias) if whiten is not None and whiten.bias is not None else None
    members = {"weights": [], "norm_bias": [], "whiten_bias": [], "other": []}
    excluded = {id(p) for p in exclude}
    for param in model.parameters():
        if not param.requires_grad or id(param) in excluded:
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
        group_lr = lr * {"norm_bias": bias_scaler, "whiten_bias": whiten_bias_scaler}.get(name, 1.0)
        decayed = name == "weights" or decay_norm_and_bias
        groups.append({"name": name, "params": params, "lr": group_lr,
                       "weight_decay": decay_per_step / group_lr if decayed and group_lr > 0 else 0.0})
    return groups


def lr_factor(step: int, total_steps: int, schedule: str, warmup_steps: int, peak_fraction: float,
              start_factor: float, end_factor: float) -> float:
    """Multiplier of a group's lr at optimizer step `step` (0-based).

    triangular (airbench): linear from start_factor at step 0 to 1 at int(peak_fraction · total)
    (with peak_fraction 0: 1 at step 0, airbench94_muon), then linear to end_factor at step `total`.
    cosine: linear warm-up from start_factor to 1 over warmup_steps, then a half cosine down to end_factor.
    """
    if schedule == "triangular":
        peak = max(1, int(peak_fraction * total_steps)) if peak_fraction > 0 else 0
        if step < peak:
            return start_factor + (1 - start_factor) * step / peak
        return 1 + (end_factor - 1) * min(1.0, (step - peak) / max(1, total_steps - peak))
    if step < warmup_steps:
        return start_factor + (1 - start_factor) * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return end_factor + (1 - end_factor) * 0.5 * (1 + math.cos(math.pi * progress))


def whiten_bias_factor(step: int, schedule, freeze_step: int | None, linear: bool) -> float:
    """The whitening bias's lr multiplier: the main schedule's (or, linear, 1 − step/freeze_step) until
    freeze_step, 0 from then on (the group is frozen)."""
    if freeze_step is None:
        return schedule(step)
    if step >= freeze_step:
        return 0.0
    return 1 - step / freeze_step if linear else schedule(step)


def check_optimizer_fits(model: nn.Module, tc: TrainConfig) -> None:
    """ConfigError for settings the model has no parameters for: Muon without conv filters, a whitening-bias
    freeze without a whitening layer."""
    if tc.optimizer == "muon" and not conv_filters(model):
        raise ConfigError(f"train.optimizer=muon updates conv filters (4-D weights), and this model "
                          f"({type(model).__name__}) has no trainable ones; use train.optimizer=sgd")
    whiten = getattr(model, "whiten", None)
    if tc.whiten_bias_epochs > 0 and (whiten is None or whiten.bias is None):
        raise ConfigError("train.whiten_bias_epochs applies to models with a whitening layer (model.name=fast); "
                          "this model has none: set train.whiten_bias_epochs=0")


def build_optimizer(model: nn.Module, tc: TrainConfig, global_batch_size: int, steps_per_epoch: int,
                    total_steps: int):
    """(optimizer, LambdaLR) for the bare model: SGD, or Muon with SGD groups (train.optimizer).

    Raises ConfigError for a whitening-bias freeze without a whitening layer, or Muon without conv filters.
    """
    check_optimizer_fits(model, tc)
    lr, decay_per_step = sgd_rates(tc, global_batch_size)
    filters = conv_filters(model) if tc.optimizer == "muon" else []
    groups = parameter_groups(model, lr, decay_per_step, tc.bias_scaler, tc.decay_norm_and_bias,
                              tc.whiten_bias_scaler, exclude=filters)
    nesterov = tc.nesterov and tc.momentum > 0
    if tc.optimizer == "muon":
        mc = tc.muon
        muon_group = {"name": "filters", "params": filters, "muon": True, "lr": mc.lr, "momentum": mc.momentum,
                      "nesterov": mc.nesterov, "weight_decay": mc.weight_decay}
        sgd_groups = [{**g, "muon": False, "momentum": tc.momentum, "nesterov": nesterov} for g in groups]
        optimizer = Muon([muon_group, *sgd_groups], lr=mc.lr, ns_steps=mc.ns_steps,
                         ns_coefficients=tuple(mc.ns_coefficients), normalize_weights=mc.normalize_weights,
                         normalize_every=mc.normalize_every, normalize_every_end=mc.normalize_every_end or None,
                         total_steps=total_steps)
        groups = optimizer.param_groups
    else:
        optimizer = torch.optim.SGD(groups, lr=lr, momentum=tc.momentum, nesterov=nesterov)
    schedule = functools.partial(
        lr_factor, total_steps=total_steps, schedule=tc.schedule,
        warmup_steps=int(tc.warmup_epochs * steps_per_epoch), peak_fraction=tc.lr_peak_fraction,
        start_factor=tc.lr_start_factor, end_factor=tc.lr_end_factor)
    # ceil, as both records count the whitening bias's steps (3 epochs of 48 or 25 steps: the same)
    freeze_step = math.ceil(tc.whiten_bias_epochs * steps_per_epoch) if tc.whiten_bias_epochs > 0 else None
    whiten = functools.partial(whiten_bias_factor, schedule=schedule, freeze_step=freeze_step,
                               linear=tc.whiten_bias_schedule == "linear")
    factors = [whiten if g["name"] == "whiten_bias" else schedule for g in groups]
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factors)
