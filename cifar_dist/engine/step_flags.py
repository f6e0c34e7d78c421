"""What all ranks agree on at each optimizer step, and its way to the host one step late.

At step n the device finds whether the loss or the update is not finite, joins that with the host's stop
request and checkpoint timer, and takes the maximum over ranks in one small all-reduce; the non-finite part
decides at once, on the device, whether step n is kept (`engine.masked_step`). The host reads the flags of
step n after it has queued step n + 1's forward and backward: the copy to pinned memory starts without
waiting and is waited for (an event, not the stream) one step later, so the host never waits for the step
it has just queued and runs a step ahead of the device. A stop or a checkpoint asked for at step n
therefore lands after step n + 1, on every rank alike.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.distributed as dist

from cifar_dist.engine.distributed import all_reduce_


class StepFlags(NamedTuple):
    """One step's flags as all ranks agreed them."""
    step: int  # the global_step after that optimizer step
    loss_nonfinite: bool
    update_nonfinite: bool  # a parameter or optimizer state the step wrote was not finite (a non-finite gradient)
    stop: int  # 0, stopping.PREEMPT or stopping.INTERRUPT
    checkpoint_due: bool

    @property
    def skipped(self) -> bool:
        """The step was masked out on the device."""
        return self.loss_nonfinite or self.update_nonfinite


class PendingFlags:
    """One step's agreed flags on their way to the host; `read` waits for them alone."""

    def __init__(self, step: int, values: torch.Tensor, host_values: tuple[int, ...] = ()):
        """values: a 1-dim tensor [loss not finite, update not finite, (stop, checkpoint due)]; host_values: the
        last two when they never left the host (a single process)."""
        self.step, self.host_values, self.ready = step, host_values, None
        self.taken = None  # the `masked_step.Taken` step, whose host values are put back if it was skipped
        if values.device.type == "cuda":
            self.values = torch.empty(values.shape, dtype=values.dtype, pin_memory=True)
            self.values.copy_(values, non_blocking=True)
            self.ready = torch.cuda.Event()
            self.ready.record()
        else:
            self.values = values

    def read(self) -> StepFlags:
        if self.ready is not None:
            self.ready.synchronize()  # this step's flags only, not the work queued after them
        loss_bad, update_bad, stop, due = self.values.tolist() + list(self.host_values)
        return StepFlags(self.step, bool(loss_bad), bool(update_bad), int(stop), bool(due))


def agree(step: int, loss: torch.Tensor, update_nonfinite: torch.Tensor, stop: int, checkpoint_due: bool,
          distributed: bool) -> tuple[torch.Tensor, PendingFlags]:
    """The flags of one step, agreed by all ranks on the device (no host read); (ok, pending): ok (a 0-dim bool
    tensor) keeps the step, pending carries the flags to the host."""
    flags = torch.stack([~torch.isfinite(loss), update_nonfinite])
    if not distributed:
        return ~flags.any(), PendingFlags(step, flags, (stop, int(checkpoint_due)))
    device = loss.device
    local = torch.tensor([stop, int(checkpoint_due)], dtype=torch.int64, pin_memory=device.type == "cuda")
    flags = torch.cat([flags.long(), local.to(device, non_blocking=True)])
    all_reduce_(flags, op=dist.ReduceOp.MAX)
    return flags[:2].sum() == 0, PendingFlags(step, flags)
