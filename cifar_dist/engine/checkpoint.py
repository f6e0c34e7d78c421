"""Checkpoints that survive anything: temp file, fsync, rename; the previous `last` kept until then."""
from __future__ import annotations

import os
from pathlib import Path

import torch

LAST = "last.pt"
PREVIOUS = "last.prev.pt"
FORMAT_VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read or does not fit the run."""


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_atomic(state: dict, path: Path, keep_previous: bool = False) -> None:
    """Write state to path so that a kill at any moment leaves a whole file behind.

    With keep_previous, the current file becomes `last.prev.pt` only once the new one is whole.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    if keep_previous and path.exists():
        os.replace(path, path.with_name(PREVIOUS))
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def load(path: Path, map_location="cpu") -> dict:
    """Read a checkpoint written by `save_atomic`, or raise CheckpointError saying why."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as err:  # truncated zip, unpickling error, ...
        raise CheckpointError(f"checkpoint {path} is corrupt or not a cifar_dist checkpoint "
                              f"({type(err).__name__}: {err})") from None
    if not isinstance(state, dict) or state.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"checkpoint {path} is not a cifar_dist checkpoint of format {FORMAT_VERSION}")
    return state


def load_resume_state(run_dir: Path, resume: str, log=print) -> dict | None:
    """The state to continue from: train.resume=auto → last.pt (or last.prev.pt if last is corrupt)."""
    if resume == "never":
        return None
    if resume != "auto":
        return load(Path(resume))
    last, previous = run_dir / LAST, run_dir / PREVIOUS
    if last.is_file():
        try:
            return load(last)
        except CheckpointError as err:
            if not previous.is_file():
                raise
            log(f"warning: {err}; falling back to the previous checkpoint {previous}")
            return load(previous)
    if previous.is_file():  # killed between the two renames of save_atomic
        log(f"warning: {last} is missing; resuming from the previous checkpoint {previous}")
        return load(previous)
    return None

