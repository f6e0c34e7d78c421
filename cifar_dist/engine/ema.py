"""Exponential moving average of a model's parameters and BN buffers, kept identical on every rank.

`EMA` and `NoEMA` (train.ema_decay=0) share one interface, so the loop never asks which it has.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from cifar_dist.engine.distributed import average_tensors_


class EMA:
    """ema ← d·ema + (1−d)·model every `every` optimizer steps.

    d = decay**every, times (step / total_steps)³ with ramp="cubic" (airbench's schedule); until
    `start_step` d is 0, so the EMA follows the model exactly. With `lookahead` the model is set
    to the EMA after each update and at the end of training (speed-record style). DDP keeps
    parameters identical across ranks; BN buffers are per-rank on CPU, so `sync()` averages them.
    """

    enabled = True

    def __init__(self, model: nn.Module, decay: float, every: int = 1, ramp: str = "none",
                 start_step: int = 0, total_steps: int = 1, lookahead: bool = False):
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.decay, self.every, self.ramp = decay, every, ramp
        self.start_step, self.total_steps, self.lookahead = start_step, total_steps, lookahead

    def decay_at(self, step: int) -> float:
        """The decay of the update after optimizer step `step` (counted from 1)."""
        if step <= self.start_step:
            return 0.0
        decay = self.decay ** self.every
        if self.ramp == "cubic":
            decay *= (step / self.total_steps) ** 3
        return decay

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        """Call after each optimizer step; `step` counts optimizer steps from 1."""
        if step % self.every:
            return
        decay = self.decay_at(step)
        ema_state, model_state = self.module.state_dict(), model.state_dict()
        for name, ema_tensor in ema_state.items():
            value = model_state[name]
            if ema_tensor.is_floating_point():
                ema_tensor.lerp_(value.to(ema_tensor.dtype), 1.0 - decay)
            else:
                ema_tensor.copy_(value)  # e.g. BN num_batches_tracked
        if self.lookahead:
            model.load_state_dict(ema_state)

    @torch.no_grad()
    def finish(self, model: nn.Module) -> None:
        """End of training: with lookahead the model becomes the EMA (airbench's update with decay 1)."""
        if self.lookahead:
            model.load_state_dict(self.module.state_dict())

    def sync(self) -> None:
        """Average parameters and buffers across ranks so every rank holds the same EMA."""
        average_tensors_(list(self.module.state_dict().values()))

    def float_buffers(self) -> list[torch.Tensor]:
        return [b for b in self.module.buffers() if b.is_floating_point()]

    def state_dict(self) -> dict:
        return {"module": self.module.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state["module"])


class NoEMA:
    """train.ema_decay=0: the same calls, doing nothing."""

    enabled = False
    module = None

    def update(self, model: nn.Module, step: int) -> None:
        pass

    def finish(self, model: nn.Module) -> None:
        pass

    def sync(self) -> None:
        pass

    def float_buffers(self) -> list[torch.Tensor]:
        return []

    def state_dict(self) -> None:
        return None

    def load_state_dict(self, state: dict | None) -> None:
        pass
