"""Checkpoints: their format, what a run saves and restores, and writes that survive anything.

A checkpoint holds the model and EMA with bare keys (they load into `build_model(cfg)`), the
optimizer, schedule and scaler, the loop's `Progress`, per-rank BN buffers, RNG states, the config
and the package version. Files are written whole or not at all (`atomic_write`); `last.pt` keeps
its predecessor as `last.prev.pt` until the new one is on disk.
"""
from __future__ import annotations

import random
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

import cifar_dist
from cifar_dist.atomic import atomic_write
from cifar_dist.config import Config, config_to_dict
from cifar_dist.engine.distributed import DistEnv, average_tensors_, gather_objects
from cifar_dist.errors import CheckpointError
from cifar_dist.run_files import LAST, PREVIOUS
from cifar_dist.models import model_identity

FORMAT_VERSION = 2


@dataclass
class Progress:
    """Where the training loop stands; saved in every checkpoint."""

    epoch: int = 0
    global_step: int = 0
    nonfinite_streak: int = 0
    nonfinite_total: int = 0
    best: dict = field(default_factory=lambda: {"model": -1.0, "ema": -1.0})
    history: list = field(default_factory=list)
    partial_epoch: dict = field(default_factory=dict)  # sums of an epoch interrupted mid-way
    wandb_run_id: str | None = None


def save(state: dict, path: Path, keep_previous: bool = False) -> None:
    """Write state to path so that a kill at any moment leaves a whole file behind."""
    previous = path.with_name(PREVIOUS) if keep_previous else None
    atomic_write(path, lambda tmp: torch.save(state, tmp), keep_previous=previous)


def read(path: Path, map_location="cpu"):
    """Whatever a `torch.save` file holds (a checkpoint, a bare state dict), or CheckpointError saying why not."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        return torch.load(path, map_location=map_location, weights_only=False)
    except Exception as err:  # truncated zip, unpickling error, ...
        raise CheckpointError(f"checkpoint {path} is corrupt or not a cifar_dist checkpoint "
                              f"({type(err).__name__}: {' '.join(str(err).split())})") from None


def load(path: Path, map_location="cpu") -> dict:
    """Read a checkpoint written by `save`, or raise CheckpointError saying why."""
    state = read(path, map_location)
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
    if previous.is_file():  # killed between the two renames of a save
        log(f"warning: {last} is missing; resuming from the previous checkpoint {previous}")
        return load(previous)
    return None


def float_buffers(module: torch.nn.Module) -> list[torch.Tensor]:
    return [b for b in module.buffers() if b.is_floating_point()]


def _averaged(state_dict: dict) -> dict:
    copy = {k: v.detach().clone() for k, v in state_dict.items()}
    average_tensors_(list(copy.values()))
    return copy


def capture(run, progress: Progress, cfg: Config, env: DistEnv) -> dict:
    """Everything needed to continue exactly (collective: every rank calls it).

    Model and EMA are stored with BN buffers averaged over ranks; each rank's own buffers are
    kept beside them, so a resume on the same world size continues bitwise.
    """
    rank_local = gather_objects({"model": [b.cpu() for b in float_buffers(run.model)],
                                 "ema": [b.cpu() for b in run.ema.float_buffers()]})
    ema_state = run.ema.state_dict()
    if ema_state is not None:
        ema_state = {**ema_state, "module": _averaged(ema_state["module"])}
    return {
        "format_version": FORMAT_VERSION,
        "package_version": cifar_dist.__version__,
        "config": config_to_dict(cfg),
        "world_size": env.world_size,
        "model": _averaged(run.model.state_dict()),
        "ema": ema_state,
        "rank_local": rank_local,
        "optimizer": run.optimizer.state_dict(),
        "scheduler": run.scheduler.state_dict(),
        "scaler": run.scaler.state_dict(),
        "progress": asdict(progress),
        "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
                "cuda": torch.cuda.get_rng_state_all() if env.device.type == "cuda" else None},
    }


def restore(run, state: dict, cfg: Config, env: DistEnv, log=print) -> Progress:
    """Load state into the assembled run (after DDP's start-up broadcast) and return its progress."""
    saved, wanted = model_identity(state["config"]["model"]), model_identity(cfg.model)
    if saved != wanted:
        raise CheckpointError(f"the checkpoint was trained with model settings {saved}, but the config asks for "
                              f"{wanted}; resume with the same model.* keys or train.resume=never")
    saved_optimizer = state["config"]["train"].get("optimizer", "sgd")
    if saved_optimizer != cfg.train.optimizer:
        raise CheckpointError(f"the checkpoint was trained with train.optimizer={saved_optimizer}, but the config asks "
                              f"for train.optimizer={cfg.train.optimizer}; their states differ: resume with "
                              f"train.optimizer={saved_optimizer}, or start afresh with train.resume=never")
    try:
        run.model.load_state_dict(state["model"])
        run.ema.load_state_dict(state["ema"])
        run.optimizer.load_state_dict(state["optimizer"])
        run.scheduler.load_state_dict(state["scheduler"])
        if state["scaler"]:
            run.scaler.load_state_dict(state["scaler"])
    except (RuntimeError, KeyError, ValueError, TypeError) as err:
        raise CheckpointError(f"checkpoint does not fit this run: {err}") from None
    if state["world_size"] == env.world_size:
        mine = state["rank_local"][env.rank]
        with torch.no_grad():
            for buffer, saved_buffer in zip(float_buffers(run.model) + run.ema.float_buffers(),
                                            mine["model"] + mine["ema"]):
                buffer.copy_(saved_buffer)
    else:
        log(f"note: resuming a run saved with world size {state['world_size']} on world size {env.world_size}: "
            "the per-rank batch and data order change; BN statistics start from their cross-rank average")
    return Progress(**state["progress"])
