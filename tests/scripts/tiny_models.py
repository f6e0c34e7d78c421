"""Test-only models, registered on import (the trainer imports this module through
`run.imports=[tiny_models]` with tests/scripts on PYTHONPATH, or train_run.py imports it).

`tiny_nobn` (no BatchNorm, no dropout); `nan_after` (its logits turn NaN after `model.nan_after`
training forwards, to exercise the non-finite-loss guard); `overflow_first` (its gradient is infinite
in the first `model.overflow_steps` backward passes while the loss stays finite, as after an fp16
overflow); `crash_after` (raises RuntimeError in training forward `model.crash_after` + 1, as a bug or
an out-of-memory error would). The last three declare keys of their own, as a user's model would.
"""
import torch
from torch import nn

from cifar_dist.keys import Key
from cifar_dist.models import register_model


class TinyNoBN(nn.Module):
    def __init__(self, num_classes: int):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).mean(dim=(2, 3)))


class NanAfter(TinyNoBN):
    def __init__(self, num_classes: int, after: int):
        super().__init__(num_classes)
        self.after, self.calls = after, 0

    def forward(self, x):
        logits = super().forward(x)
        if self.training:
            self.calls += 1
            if self.calls > self.after:
                logits = logits * float("nan")
        return logits


class CrashAfter(TinyNoBN):
    def __init__(self, num_classes: int, after: int):
        super().__init__(num_classes)
        self.after, self.calls = after, 0

    def forward(self, x):
        if self.training:
            self.calls += 1
            if self.calls > self.after:
                raise RuntimeError(f"crash_after: training forward {self.calls} fails on purpose")
        return super().forward(x)


class InfiniteGradient(torch.autograd.Function):
    """Identity forward; the gradient of the first `budget[0]` backward passes is infinite."""

    @staticmethod
    def forward(ctx, x, budget):
        ctx.budget = budget
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        if ctx.budget[0] > 0:
            ctx.budget[0] -= 1
            return grad * float("inf"), None
        return grad, None


class OverflowFirst(TinyNoBN):
    def __init__(self, num_classes: int, steps: int):
        super().__init__(num_classes)
        self.budget = [steps]

    def forward(self, x):
        return InfiniteGradient.apply(super().forward(x), self.budget)


register_model("tiny_nobn")(lambda num_classes: TinyNoBN(num_classes))
register_model("nan_after", options=(
    Key(10, "nan_after: training forwards before the logits turn NaN", range="[0, inf)", name="nan_after"),
))(lambda num_classes, nan_after: NanAfter(num_classes, nan_after))
register_model("overflow_first", options=(
    Key(20, "overflow_first: backward passes whose gradient is infinite", range="[0, inf)", name="overflow_steps"),
))(lambda num_classes, overflow_steps: OverflowFirst(num_classes, overflow_steps))
register_model("crash_after", options=(
    Key(20, "crash_after: training forwards before one raises RuntimeError", range="[0, inf)", name="crash_after"),
))(lambda num_classes, crash_after: CrashAfter(num_classes, crash_after))
