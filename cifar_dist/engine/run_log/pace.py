"""How fast the run goes, for the ETAs: seconds per optimizer step and per epoch end, as the host sees them.

The first steps of a launch are not timed (memory allocation, cuDNN autotuning, compilation); the time
between an epoch's last step and the next epoch's start (evaluation, checkpoint) is kept apart, as the
cost of an epoch end. The host runs at most a step ahead of the device, so its clock is the device's.
"""
from __future__ import annotations

import math
from time import monotonic

WARMUP_STEPS = 2  # the first steps of a launch, not timed


class Pace:
    def __init__(self):
        self.steps_seen = self.timed_steps = self.epoch_ends = 0
        self.step_seconds = self.epoch_end_seconds = 0.0
        self.last_step_at: float | None = None

    def start_epoch(self) -> None:
        now = monotonic()
        if self.last_step_at is not None:  # the end of the epoch before: evaluation, checkpoint, logging
            self.epoch_ends += 1
            self.epoch_end_seconds += now - self.last_step_at
        self.last_step_at = now

    def step(self) -> None:
        now = monotonic()
        self.steps_seen += 1
        if self.steps_seen > WARMUP_STEPS and self.last_step_at is not None:
            self.timed_steps += 1
            self.step_seconds += now - self.last_step_at
        self.last_step_at = now

    @property
    def seconds_per_step(self) -> float | None:
        return self.step_seconds / self.timed_steps if self.timed_steps else None

    def eta_s(self, steps_left: int, epoch_ends_left: int = 0) -> float | None:
        """Seconds for steps_left more steps and epoch_ends_left more epoch ends; None before any step is timed."""
        per_step = self.seconds_per_step
        if per_step is None:
            return None
        per_end = self.epoch_end_seconds / self.epoch_ends if self.epoch_ends else 0.0
        return steps_left * per_step + epoch_ends_left * per_end


def duration_words(seconds: float) -> str:
    """'45 s', '12 min 5 s', '3 h 20 min', '2 d 4 h'."""
    seconds = max(0, math.ceil(seconds))
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days} d {hours} h"
    if hours:
        return f"{hours} h {minutes} min"
    if minutes:
        return f"{minutes} min {secs} s"
    return f"{secs} s"
