"""Child processes that die with their parent and leave Ctrl-C to it, so a killed or interrupted launcher or
prepare leaves none behind and prints one line."""
from __future__ import annotations

import contextlib
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


@contextlib.contextmanager
def children_leave_ctrl_c_to_parent():
    """Processes forked within never receive SIGINT; a Ctrl-C meanwhile reaches this process on leaving.

    A terminal sends Ctrl-C to its whole process group: workers that took it would each print a
    traceback, while the parent decides what Ctrl-C means and stops them. SIGINT is blocked in this
    thread while forking, and the children keep it blocked. Another thread may still take a Ctrl-C
    meanwhile; it is held until the end, since a KeyboardInterrupt raised inside os.fork's hooks is
    swallowed ("Exception ignored"), or leaves a child started but not yet known to its Process.
    Main thread only (it sets a signal handler).
    """
    held = []
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    handler = signal.signal(signal.SIGINT, lambda *_: held.append(True))
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)  # a Ctrl-C pending on this thread is held now
        signal.signal(signal.SIGINT, handler)
    if held:
        signal.raise_signal(signal.SIGINT)  # handled as it would have been: KeyboardInterrupt, or ignored
