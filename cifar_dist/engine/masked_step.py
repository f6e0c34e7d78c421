"""The non-finite skip on the device: the step is taken, then put back where all ranks agreed it was not finite.

GradScaler skips a step after an fp16 overflow by reading its found_inf on the host (`.item()`), except with a
fused optimizer, whose kernel takes found_inf and skips on the device. Neither torch's SGD as built here nor
our Muon takes it, and the cheaper tricks are not exact: an update undone arithmetically does not give the
weights back bit for bit, and a zeroed gradient still moves the momentum and the weight decay. So the step
writes the live tensors as usual, with what it may write copied aside first, and `torch.where(ok, new, old)`
keeps the old values where the step is skipped: bit for bit the state before, whatever the step computed (NaN
included), and nothing read on the host.

The tensors are copied to and from views of one flat buffer per dtype (`torch._foreach_copy_`), so a step
costs a few calls whatever the number of tensors (no kernel launch per tensor): `take` copies live → saved,
steps, copies live → new and finds whether any new parameter or optimizer state is not finite (one check
over the flat buffer: what a non-finite gradient leaves, so no separate gradient norm is needed); `keep`
selects new = where(ok, new, saved) over the flat buffer and copies new → live. What a step writes: the
trainable parameters and the optimizer's state tensors (the momentum buffers, made to exist from the start
so that a skipped first step has a state to keep), and on the steps that update the EMA its tensors (with
lookahead the model's whole state too).

Values the optimizer keeps on the host (Muon's step counters) cannot be selected on the device: `take`
keeps the parameter groups as they were before and after the step, and `undo_host` puts back what the step
changed once the host learns of the skip, one step later but before the next optimizer step.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import torch
from torch import nn


def start_momentum(optimizer: torch.optim.Optimizer) -> None:
    """Give each parameter the zero momentum buffer its first step would start from (torch's SGD and our Muon keep
    it under "momentum_buffer"; m·0 + g is the first step's g), so that every step has a state to keep."""
    for group in optimizer.param_groups:
        if group.get("momentum", 0) == 0 and not group.get("muon", False):
            continue
        for param in group["params"]:
            if param.requires_grad:
                optimizer.state[param].setdefault("momentum_buffer", torch.zeros_like(param))


def _unique(tensors) -> list[torch.Tensor]:
    """Each memory once: a state dict holds views of the parameters, not the parameters."""
    seen, unique = set(), []
    for tensor in tensors:
        key = (tensor.data_ptr(), tensor.shape, tensor.dtype)
        if key not in seen:
            seen.add(key)
            unique.append(tensor)
    return unique


def _dense(tensor: torch.Tensor) -> bool:
    """Its elements fill numel consecutive places, in some order (contiguous, channels_last, ...)."""
    expected = 1
    for stride, size in sorted((st, sz) for st, sz in zip(tensor.stride(), tensor.shape) if sz > 1):
        if stride != expected:
            return False
        expected *= size
    return True


class FlatCopies:
    """Views with the layout of each tensor of `like` into one flat buffer per dtype, in the order given (so
    the first k tensors of each dtype fill a prefix of its buffer)."""

    def __init__(self, like: list[torch.Tensor]):
        self.flat: dict[torch.dtype, torch.Tensor] = {}
        self.views, self.ends = [], []  # ends[i]: {dtype: end of the tensors up to i in that dtype's buffer}
        sizes: dict[torch.dtype, int] = {}
        offsets = []
        for tensor in like:
            offsets.append(sizes.get(tensor.dtype, 0))
            sizes[tensor.dtype] = offsets[-1] + tensor.numel()
            self.ends.append(dict(sizes))
        for dtype, size in sizes.items():
            device = next(t.device for t in like if t.dtype == dtype)
            self.flat[dtype] = torch.empty(size, dtype=dtype, device=device)
        for tensor, offset in zip(like, offsets):
            stride = tensor.stride() if _dense(tensor) else None  # the same strides: the fast copies
            buffer = self.flat[tensor.dtype]
            view = (buffer.as_strided(tensor.shape, stride, offset) if stride is not None
                    else buffer[offset:offset + tensor.numel()].view(tensor.shape))
            self.views.append(view)

    def prefixes(self, count: int) -> dict[torch.dtype, int]:
        """How much of each buffer the first count tensors fill."""
        return self.ends[count - 1] if count else {}


class Taken(NamedTuple):
    """A step taken by `MaskedStep.take`, not yet kept or put back."""
    count: int  # how many of the live tensors it wrote
    nonfinite: torch.Tensor  # 0-dim bool: a parameter or optimizer state it wrote is not finite
    groups_before: list[dict]  # shallow copies of the parameter groups before the optimizer step
    groups_after: list[dict]  # ... and right after it (the schedule changes them later)


class MaskedStep:
    """The optimizer step and the EMA update of one training step, kept only where all ranks agree it is finite."""

    def __init__(self, optimizer: torch.optim.Optimizer, model: nn.Module, ema):
        """Call after the run's state is restored: it keeps references to the optimizer's state tensors."""
        self.optimizer = optimizer
        start_momentum(optimizer)
        params = [p for group in optimizer.param_groups for p in group["params"] if p.requires_grad]
        state = [t for p in params for t in optimizer.state[p].values() if isinstance(t, torch.Tensor)]
        stepped = _unique(params + state)
        ema_writes = []
        if ema.enabled:
            ema_writes = list(ema.module.state_dict().values()) + (list(model.state_dict().values())
                                                                   if ema.lookahead else [])
        self.live = _unique(stepped + ema_writes)  # what every step writes first, then what EMA updates add
        self.num_stepped = len(stepped)
        self.saved, self.new = FlatCopies(self.live), FlatCopies(self.live)

    @torch.no_grad()
    def take(self, update_ema: Callable[[], None], ema_updates: bool) -> Taken:
        """optimizer.step() then update_ema(), the values before kept aside; ema_updates: whether update_ema writes
        anything this step. Nothing is final until `keep`."""
        count = len(self.live) if ema_updates else self.num_stepped
        live = self.live[:count]
        torch._foreach_copy_(self.saved.views[:count], live)
        before = [dict(group) for group in self.optimizer.param_groups]
        self.optimizer.step()
        after = [dict(group) for group in self.optimizer.param_groups]
        update_ema()
        torch._foreach_copy_(self.new.views[:count], live)
        # A sum is not finite exactly when an element is not (a sum of finite values would overflow float32 only
        # with values near 1e32), and one reduction costs far less than isfinite() and all().
        sums = [self.new.flat[dtype][:end].sum(dtype=torch.float64 if dtype == torch.float64 else torch.float32)
                for dtype, end in self.new.prefixes(self.num_stepped).items() if dtype.is_floating_point]
        nonfinite = ~torch.isfinite(sums[0] if len(sums) == 1 else torch.stack(sums).sum())
        return Taken(count, nonfinite, before, after)

    @torch.no_grad()
    def keep(self, taken: Taken, ok: torch.Tensor) -> None:
        """The step's values where ok (a 0-dim bool tensor), the values before it elsewhere; on the device."""
        for dtype, end in self.new.prefixes(taken.count).items():
            torch.where(ok, self.new.flat[dtype][:end], self.saved.flat[dtype][:end], out=self.new.flat[dtype][:end])
        torch._foreach_copy_(self.live[:taken.count], self.new.views[:taken.count])

    def undo_host(self, taken: Taken) -> None:
        """Put back the host values the optimizer step of a skipped step changed."""
        for group, before, after in zip(self.optimizer.param_groups, taken.groups_before, taken.groups_after):
            for key, value in before.items():
                if after[key] is not value:
                    group[key] = value
