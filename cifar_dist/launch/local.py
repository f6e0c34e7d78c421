"""One node, N ranks: `python -m cifar_dist.launch.local --nproc N [--max-restarts R] -- [train args]`.

What `launch/train` runs. Like `torchrun --standalone` it starts one trainer per rank with RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT (a free loopback port) set, and restarts the
whole group when a worker crashes; the restarted group resumes from last.pt. Unlike torchrun:
- the trainer's own exit codes (`errors.ExitCode`: 0 finished, 2 bad config/data/checkpoint, 3 diverged,
  75 stopped by SIGTERM/SIGUSR2, 130 by Ctrl-C) are final, and the launcher ends with them, without a
  traceback; only a crash (any other code, or a killed worker) restarts the group;
- signals are forwarded once: a first Ctrl-C (SIGINT), SIGTERM or SIGUSR2 reaches every worker,
  which finishes its step, writes last.pt and exits; no restart follows. A second Ctrl-C kills the
  workers at once.
Workers run in sessions of their own (a terminal's Ctrl-C reaches them through the launcher only)
and die with the launcher (PR_SET_PDEATHSIG), so none outlives it.
"""
from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time
import uuid

from cifar_dist.errors import ExitCode, at_least, describe_exit
from cifar_dist.lifetime import die_with_parent

GRACE_S = 60.0  # how long the other ranks may take to follow a rank that ended with a final code
FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR2)
# When ranks end differently, the code the group reports: a stop the user asked for first, then one
# a scheduler should requeue, then the failures that need the user.
PRECEDENCE = (ExitCode.INTERRUPTED, ExitCode.PREEMPTED, ExitCode.DIVERGED, ExitCode.USER_ERROR)


def is_final(code: int) -> bool:
    """A worker's code that ends the group for good (no restart): one of the trainer's own, but a crash."""
    return code in ExitCode._value2member_map_ and ExitCode(code).final


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalGroup:
    """The worker processes of one attempt, and the signals the launcher received."""

    def __init__(self, nproc: int, train_args: list[str]):
        self.nproc, self.train_args = nproc, train_args
        self.procs: list[subprocess.Popen] = []
        self.stop_requested, self.interrupts = False, 0
        self.run_id = os.environ.get("TORCHELASTIC_RUN_ID") or uuid.uuid4().hex[:12]

    def handle(self, signum: int, _frame) -> None:
        if signum == signal.SIGINT:
            self.interrupts += 1
        if self.interrupts >= 2:
            print("launch: second Ctrl-C: killing the workers", file=sys.stderr, flush=True)
            self.kill()
            return
        if not self.stop_requested:
            print(f"launch: {signal.Signals(signum).name}: each worker finishes its step and writes last.pt"
                  + (" (Ctrl-C again to abort)" if signum == signal.SIGINT else ""), file=sys.stderr, flush=True)
        self.stop_requested = True
        for proc in self.alive():
            proc.send_signal(signum)

    def alive(self) -> list[subprocess.Popen]:
        return [p for p in self.procs if p.poll() is None]

    def kill(self) -> None:
        for proc in self.alive():
            proc.kill()
        for proc in self.procs:
            proc.wait()

    def start(self, attempt: int) -> None:
        env = dict(os.environ, WORLD_SIZE=str(self.nproc), LOCAL_WORLD_SIZE=str(self.nproc),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), TORCHELASTIC_RUN_ID=self.run_id,
                   TORCHELASTIC_RESTART_COUNT=str(attempt))
        if self.nproc > 1 and "OMP_NUM_THREADS" not in env:
            env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // self.nproc))
        command = [sys.executable, "-m", "cifar_dist.train", *self.train_args]
        self.procs = [subprocess.Popen(command, env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
                                       start_new_session=True, preexec_fn=die_with_parent)
                      for r in range(self.nproc)]

    def wait(self) -> list[int]:
        """Exit codes of all workers; a crash (a code that is not final) takes the others down at once."""
        first_final = None
        while self.alive():
            codes = [p.poll() for p in self.procs]
            if any(c is not None and not is_final(c) for c in codes):
                self.kill()
            elif any(c not in (None, 0) for c in codes):
                first_final = first_final or time.monotonic()
                if time.monotonic() - first_final > GRACE_S:
                    self.kill()
            time.sleep(0.1)
        return [p.wait() for p in self.procs]


def exit_code(codes: list[int]) -> ExitCode:
    """The group's code: the most telling final code, or CRASHED."""
    if not all(is_final(c) for c in codes):
        return ExitCode.CRASHED
    return next((c for c in PRECEDENCE if c in codes), ExitCode.FINISHED)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cifar_dist.launch.local", description=__doc__.split("\n\n")[0])
    parser.add_argument("--nproc", type=at_least(1), default=1, help="ranks (one per GPU)")
    parser.add_argument("--max-restarts", type=at_least(0), default=3, help="restarts of the group after a crash")
    parser.add_argument("train_args", nargs=argparse.REMAINDER, help="-- then the trainer's arguments")
    args = parser.parse_args(argv)
    train_args = args.train_args[1:] if args.train_args[:1] == ["--"] else args.train_args
    group = LocalGroup(args.nproc, train_args)
    for s in FORWARDED:
        signal.signal(s, group.handle)
    for attempt in range(args.max_restarts + 1):
        group.start(attempt)
        codes = group.wait()
        if group.interrupts >= 2:
            return ExitCode.INTERRUPTED
        code = exit_code(codes)
        if code != ExitCode.CRASHED:
            return code
        failed = ", ".join(f"rank {r}: {describe_exit(c)}" for r, c in enumerate(codes) if not is_final(c))
        if group.stop_requested or attempt == args.max_restarts:
            print(f"launch: the group failed ({failed}); no restart left", file=sys.stderr, flush=True)
            return ExitCode.CRASHED
        print(f"launch: the group failed ({failed}); restart {attempt + 1} of {args.max_restarts} resumes "
              "from last.pt", file=sys.stderr, flush=True)
    return ExitCode.CRASHED


if __name__ == "__main__":
    sys.exit(main())
