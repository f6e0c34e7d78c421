"""Child processes that die with their parent, so a killed launcher or prepare leaves none behind."""
from __future__ import annotations

import ctypes
import functools
import os
import signal

PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """Ask the kernel to SIGKILL this process when its parent dies (Linux); call it in the child."""
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


@functools.cache
def children_die_with_parent() -> None:
    """From now on, every process this one forks (multiprocessing workers) dies with it. Idempotent."""
    os.register_at_fork(after_in_child=die_with_parent)
