"""Checkpoints: their format, what a run saves and restores, and writes that survive anything.

A checkpoint holds the model and EMA with bare keys (they load into `build_model(cfg)`), the
optimizer, schedule and scaler, the loop's `Progress`, per-rank BN buffers, the config and the
package version: tensors and plain data only, so that `read` loads it with torch's weights-only
unpickler and a file from elsewhere runs no code. No RNG state: every random draw of training is
derived from (seed, rank, epoch, step). Files are written whole or not at all (`atomic_write`);
`last.pt` keeps its predecessor as `last.prev.pt` until the new one is on disk.
"""
from __future__ import annotations

import pickle
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch

try:
    from numpy._core.multiarray import _reconstruct
except ImportError:  # numpy < 2
    from numpy.core.multiarray import _reconstruct

import cifar_dist
from cifar_dist.atomic import atomic_write
from cifar_dist.config import Config, config_to_dict
from cifar_dist.engine.distributed import DistEnv, average_tensors_, gather_objects
from cifar_dist.errors import CheckpointError, one_line
from cifar_dist.run_files import LAST, PREVIOUS
from cifar_dist.models import model_identity

FORMAT_VERSION = 2
# Earlier checkpoints of this format also kept the RNG states, numpy's as a uint32 array (now ignored).
# Rebuilding that array takes these globals and runs nothing else (an empty array of the dtype, filled
# from bytes); `read` allows them by name, under numpy 1's and numpy 2's spelling of the module.
LEGACY_RNG_GLOBALS = [(_reconstruct, "numpy.core.multiarray._reconstruct"),
                      (_reconstruct, "numpy._core.multiarray._reconstruct"),
                      np.ndarray, np.dtype, type(np.dtype(np.uint32))]
REFUSED_GLOBAL = re.compile(r"GLOBAL ([\w.]+)|but got <class '([\w.]+)'>")
WEIGHTS_ONLY_HINT = ("only tensors and plain data (numbers, strings, lists, dicts) load, so that a file from "
                     "elsewhere cannot run code here: use a checkpoint written by cifar-dist, or have its author save "
                     "the weights as a state dict of tensors (torch.save(model.state_dict(), path))")


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


class RefusedCheckpoint(CheckpointError):
    """A file that would run code when loaded: never a torn write, so resume does not fall back past it."""


def save(state: dict, path: Path, keep_previous: bool = False) -> None:
    """Write state to path so that a kill at any moment leaves a whole file behind; a full disk replaces nothing
    and is a UserError saying so."""
    previous = path.with_name(PREVIOUS) if keep_previous else None
    atomic_write(path, lambda tmp: torch.save(state, tmp), keep_previous=previous,
                 if_disk_full="free some space there, then run the same command again: it resumes from the last "
                              "checkpoint written whole")


def read(path: Path, map_location="cpu"):
    """Whatever a `torch.save` file holds (a checkpoint, a bare state dict), loaded weights-only: tensors and
    plain data, no code run. CheckpointError saying why not; RefusedCheckpoint naming what would have run."""
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"checkpoint {path} is a folder; pass a checkpoint file in it (last.pt, best_ema.pt)")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        with torch.serialization.safe_globals(LEGACY_RNG_GLOBALS):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:  # torch's weights-only unpickler refused a global
        refused = REFUSED_GLOBAL.search(str(err))
        if refused:
            raise RefusedCheckpoint(f"checkpoint {path} holds a `{refused.group(1) or refused.group(2)}` call, which "
                                    f"loading would run: refused; {WEIGHTS_ONLY_HINT}") from None
        detail = re.search(r"WeightsUnpickler error:(.*?)(?:Check the documentation|$)", str(err), re.S)
        raise CheckpointError(f"checkpoint {path} is corrupt or not a cifar_dist checkpoint "
                              f"({one_line(detail.group(1) if detail else err)})") from None
    except Exception as err:  # truncated zip, not a torch file, ...
        raise CheckpointError(f"checkpoint {path} is corrupt or not a cifar_dist checkpoint "
                              f"({type(err).__name__}: {one_line(err)})") from None


def _tensor_dict(value, entry: str) -> str | None:
    """Why value is not a dict of tensors (None when it is)."""
    if not isinstance(value, dict):
        return f"'{entry}' is {type(value).__name__}, expected a dict of tensors"
    wrong = next((key for key, tensor in value.items() if not torch.is_tensor(tensor)), None)
    return None if wrong is None else \
        f"'{entry}.{wrong}' is {type(value[wrong]).__name__}, expected a tensor"


def _tensor_list(value, entry: str) -> str | None:
    if not isinstance(value, list) or not all(torch.is_tensor(t) for t in value):
        return f"'{entry}' is not a list of tensors"
    return None


def _weights_problem(state: dict) -> str | None:
    """The first entry inference relies on that is missing or mistyped, described (None when all fit)."""
    config = state.get("config")
    if not isinstance(config, dict):
        return "no 'config' dict" if config is None else f"'config' is {type(config).__name__}, expected a dict"
    for section in ("model", "train"):
        if not isinstance(config.get(section), dict):
            return f"'config.{section}' is {type(config.get(section)).__name__}, expected a dict"
    if "model" not in state:
        return "no 'model' entry (the weights)"
    problem = _tensor_dict(state["model"], "model")
    if problem or state.get("ema") is None:
        return problem
    ema = state["ema"]
    if not isinstance(ema, dict) or "module" not in ema:
        return f"'ema' is {type(ema).__name__} without a 'module' dict, expected None or {{'module': tensors}}"
    return _tensor_dict(ema["module"], "ema.module")


def _resume_problem(state: dict) -> str | None:
    """The first entry a resume relies on, beyond the weights, that is missing or mistyped."""
    for entry, kind in (("optimizer", dict), ("scheduler", dict), ("scaler", dict), ("progress", dict),
                        ("world_size", int), ("rank_local", list)):
        if entry not in state:
            return f"no '{entry}' entry"
        if not isinstance(state[entry], kind) or isinstance(state[entry], bool):
            return f"'{entry}' is {type(state[entry]).__name__}, expected {kind.__name__}"
    unknown = sorted(set(state["progress"]) - {f.name for f in fields(Progress)})
    if unknown:
        return f"'progress' holds unknown entries {', '.join(map(repr, unknown))}"
    world_size, rank_local = state["world_size"], state["rank_local"]
    if world_size < 1 or len(rank_local) != world_size:
        return f"'rank_local' holds {len(rank_local)} entries for world_size {world_size}"
    for rank, mine in enumerate(rank_local):
        if not isinstance(mine, dict):
            return f"'rank_local[{rank}]' is {type(mine).__name__}, expected a dict"
        problem = _tensor_list(mine.get("model"), f"rank_local[{rank}].model") or \
            _tensor_list(mine.get("ema"), f"rank_local[{rank}].ema")
        if problem:
            return problem
    return None


def check(state, path: Path, for_resume: bool = True) -> dict:
    """state, once its format and the entries the code relies on are checked (for a resume: all of them; for
    inference: config and weights); CheckpointError naming the first that is missing or mistyped."""
    if not isinstance(state, dict) or "format_version" not in state:
        found = "a state dict of tensors" if isinstance(state, dict) and state and \
            all(torch.is_tensor(v) for v in state.values()) else type(state).__name__
        raise CheckpointError(f"{path} is not a cifar_dist checkpoint (found {found}, without 'format_version'); "
                              "pass a run's last.pt, last.prev.pt, best.pt or best_ema.pt")
    if state["format_version"] != FORMAT_VERSION:
        raise CheckpointError(f"checkpoint {path} has format {state['format_version']!r}; this version "
                              f"({cifar_dist.__version__}) reads format {FORMAT_VERSION}: use the cifar_dist version "
                              f"that wrote it ({state.get('package_version', 'unknown')})")
    problem = _weights_problem(state) or (_resume_problem(state) if for_resume else None)
    if problem:
        raise CheckpointError(f"checkpoint {path} does not hold what a cifar_dist checkpoint of format "
                              f"{FORMAT_VERSION} holds: {problem}; it was not written by cifar-dist or was edited: "
                              "use a run's last.pt, last.prev.pt or best_ema.pt as written")
    return state


def load(path: Path, map_location="cpu") -> dict:
    """Read a checkpoint written by `save` and check all its entries, or raise CheckpointError saying why."""
    return check(read(path, map_location), Path(path))


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
        except RefusedCheckpoint:
            raise
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
        raise CheckpointError(f"checkpoint does not fit this run ({one_line(err)}); resume with the config it was "
                              "trained with, or start afresh with train.resume=never") from None
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
