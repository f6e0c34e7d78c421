"""What can go wrong for a user, and the exit codes that say how a command ended: one home for both.

Torch-free, so that every command, launcher and the sbatch template can read it cheaply. A
`UserError` is bad input the user can fix (a config key, a data file, a checkpoint, a command-line
argument): every entry point reports it as one line naming what to fix and exits with
`ExitCode.USER_ERROR`, before any work and without leaving half-written output.
"""
from __future__ import annotations

import argparse
import enum
import signal


class UserError(Exception):
    """Bad input the user can fix; the message says what was expected, what was found and what to do."""


class ConfigError(UserError):
    """A config file, override or command-line argument that does not fit."""


class DataError(UserError):
    """Input data that is missing or not what CIFAR-10 (or a file to predict) should be."""


class CheckpointError(UserError):
    """A checkpoint that cannot be read or does not fit the run."""


class ExitCode(enum.IntEnum):
    """How a command or a training run ended (the README's table; launchers and slurm/train.sbatch read it)."""

    FINISHED = 0
    CRASHED = 1  # an unexpected exception: a bug, OOM, a lost rank
    USER_ERROR = 2  # bad config, data, checkpoint or argument: the message says what to fix
    DIVERGED = 3  # train.max_nonfinite_steps consecutive non-finite losses
    PREEMPTED = 75  # stopped by SIGTERM/SIGUSR2 with last.pt written: run again (or requeue) to resume
    INTERRUPTED = 130  # stopped by Ctrl-C with last.pt written

    @property
    def meaning(self) -> str:
        return _MEANINGS[self]

    @property
    def final(self) -> bool:
        """Whether running the same command again unchanged could not do better than a resume (no restart)."""
        return self is not ExitCode.CRASHED


_MEANINGS = {
    ExitCode.FINISHED: "finished",
    ExitCode.CRASHED: "crashed",
    ExitCode.USER_ERROR: "bad config, data or checkpoint",
    ExitCode.DIVERGED: "diverged",
    ExitCode.PREEMPTED: "stopped by SIGTERM/SIGUSR2",
    ExitCode.INTERRUPTED: "stopped by Ctrl-C",
}


_STATUS_WORDS = {
    ExitCode.FINISHED: "finished",
    ExitCode.DIVERGED: "diverged",
    ExitCode.PREEMPTED: "stopped",
    ExitCode.INTERRUPTED: "stopped",
}


def exit_status(code: int) -> str:
    """The word status.json, slurm.json and sweep-summary use for a run that ended with this code: finished,
    diverged, stopped, or failed (an exception or bad input; the recorded cause says which). A run that
    died without a word (SIGKILL, a lost node) is `crashed`, which only `run_files.run_status` can tell."""
    return _STATUS_WORDS.get(code, "failed")


def describe_exit(code: int) -> str:
    """'exit code 75 (stopped by SIGTERM/SIGUSR2)', 'killed by SIGKILL' for a process's return code."""
    if code < 0:
        return f"killed by {signal.Signals(-code).name}"
    known = code in ExitCode._value2member_map_ and code != ExitCode.CRASHED
    return f"exit code {code}" + (f" ({ExitCode(code).meaning})" if known else "")


def one_line(err: BaseException, limit: int = 400) -> str:
    """An exception's message on one line (whitespace collapsed), cut at limit characters."""
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= limit else text[: limit - 1] + "…"


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser, but a bad argument is a ConfigError (one line, exit 2) instead of usage + message."""

    def error(self, message: str):
        raise ConfigError(f"{message} (`{self.prog} --help` describes the arguments)")


def at_least(low: int):
    """An argparse type: an integer >= low."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        return value
    return parse
