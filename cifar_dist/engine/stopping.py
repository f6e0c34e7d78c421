"""Stop requests: signals become a flag that the loop acts on after its step, on every rank at once.

SIGTERM (preemption, `scancel`) and SIGUSR2 (Slurm's warning before a time limit) ask for a stop
that a scheduler should follow with a requeue; a first SIGINT (Ctrl-C) asks for a stop that the
user made. Either way the loop finishes its step, writes last.pt and exits (75 or 130). A second
SIGINT aborts at once.
"""
from __future__ import annotations

import signal

PREEMPT, INTERRUPT = 1, 2  # kinds of stop, ordered: when ranks disagree the higher one wins
STOP_SIGNALS = {signal.SIGTERM: PREEMPT, signal.SIGUSR2: PREEMPT, signal.SIGINT: INTERRUPT}


class StopRequests:
    """A context manager that installs the handlers; `kind` is 0 until a stop is requested."""

    def __init__(self, log=print):
        self.kind = 0
        self.log = log
        self._previous = {}

    def __enter__(self) -> "StopRequests":
        self._previous = {s: signal.signal(s, self._handle) for s in STOP_SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)

    def _handle(self, signum: int, _frame) -> None:
        if signum == signal.SIGINT and self.kind:
            raise KeyboardInterrupt  # the second Ctrl-C: abort now
        if not self.kind:
            how = "Ctrl-C again to abort" if signum == signal.SIGINT else "then exiting"
            self.log(f"received {signal.Signals(signum).name}: finishing the step, writing last.pt ({how})")
        self.kind = max(self.kind, STOP_SIGNALS[signum])


def ignore_late_stop_signals() -> None:
    """After the loop, SIGTERM and SIGUSR2 have nothing left to save. They do arrive then: as soon as
    one rank exits 75, `srun --kill-on-bad-exit` and torchrun signal the others, which may still be
    leaving the barrier. Ignored, those ranks end with the run's own exit code (75), not killed by
    the signal (143), so that the scheduler script still sees a stop it should requeue."""
    for s in (signal.SIGTERM, signal.SIGUSR2):
        signal.signal(s, signal.SIG_IGN)
