"""Exponential moving average of a model's parameters and BN buffers, kept on every rank."""
from __future__ import annotations

import copy

import torch
from torch import nn

from cifar_dist.engine.distributed import average_tensors_


class EMA:
    """ema ← d·ema + (1−d)·model every `every` steps, d warmed up over `warmup_steps` updates.

    DDP keeps parameters identical across ranks, so the EMA parameters are too; BN buffers are
    per-rank on CPU (no SyncBN), so `sync()` averages them before evaluation and saving.
    With `lookahead`, the model is reset to the EMA after each update (speed-record style).
    """

    def __init__(self, model: nn.Module, decay: float, every: int = 1, warmup_steps: int = 0,
                 lookahead: bool = False):
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.decay, self.every, self.warmup_steps, self.lookahead = decay, every, warmup_steps, lookahead
        self.num_updates = 0

    def decay_now(self) -> float:
        """The decay of the next update; 0 at first, so the EMA starts as a copy of the model."""
        if self.warmup_steps <= 0:
            return self.decay
        return min(self.decay, self.num_updates / self.warmup_steps)

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        """Call after each optimizer step; `step` counts optimizer steps from 1."""
        if step % self.every:
            return
        decay = self.decay_now() ** self.every
        ema_state, model_state = self.module.state_dict(), model.state_dict()
        for name, ema_tensor in ema_state.items():
            value = model_state[name]
            if ema_tensor.is_floating_point():
                ema_tensor.lerp_(value.to(ema_tensor.dtype), 1.0 - decay)
            else:
                ema_tensor.copy_(value)  # e.g. BN num_batches_tracked
        self.num_updates += 1
        if self.lookahead:
            model.load_state_dict(ema_state)

    def sync(self) -> None:
        """Average parameters and buffers across ranks so every rank holds the same EMA."""
        average_tensors_(list(self.module.state_dict().values()))

    def state_dict(self) -> dict:
        return {"module": self.module.state_dict(), "num_updates": self.num_updates}

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state["module"])
        self.num_updates = state["num_updates"]
