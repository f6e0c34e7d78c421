"""Process-group set-up from torchrun's or Slurm's environment, and the collectives we use."""
from __future__ import annotations

import contextlib
import os
import subprocess
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from cifar_dist.errors import ConfigError


@dataclass
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _first_slurm_host() -> str:
    nodelist = os.environ.get("SLURM_JOB_NODELIST") or os.environ.get("SLURM_NODELIST", "")
    try:
        hosts = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True,
                               text=True, check=True).stdout.split()
        return hosts[0]
    except (OSError, subprocess.CalledProcessError, IndexError):
        return "127.0.0.1"


def read_launch_env() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun, else Slurm, else a single process."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0))
    if "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", 1)) > 1:
        env.setdefault("MASTER_ADDR", _first_slurm_host())
        # One port per job and start: a requeued job does not meet its previous run's socket.
        start = int(env.get("SLURM_JOB_ID", 0)) * 7 + int(env.get("SLURM_RESTART_COUNT", 0))
        env.setdefault("MASTER_PORT", str(20000 + start % 20000))
        return int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0))
    return 0, 1, 0


def pick_device(preference: str, local_rank: int) -> torch.device:
    if preference == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device=cuda but no CUDA device is visible; use train.device=auto or cpu")
    if preference != "cpu" and torch.cuda.is_available():
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def init_distributed(device_preference: str = "auto", timeout_min: float = 30.0) -> DistEnv:
    """Join the process group (NCCL on CUDA, gloo on CPU) when launched with several ranks."""
    rank, world_size, local_rank = read_launch_env()
    device = pick_device(device_preference, local_rank)
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        timeout = timedelta(minutes=timeout_min)
        store, _, _ = next(dist.rendezvous("env://", rank, world_size, timeout=timeout))
        # After a torchrun restart the store can still hold the dead round's addresses; keys of
        # our own per attempt keep the new group from dialling them.
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        dist.init_process_group(backend, store=dist.PrefixStore(f"cifar_dist/attempt_{attempt}", store),
                                rank=rank, world_size=world_size, timeout=timeout,
                                device_id=device if device.type == "cuda" else None)
    return DistEnv(rank, world_size, local_rank, device)


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def process_group(device_preference: str = "auto"):
    """`init_distributed` on entry, `shutdown` on exit: for the commands besides training."""
    env = init_distributed(device_preference)
    try:
        yield env
    finally:
        shutdown()


def all_reduce_(tensor: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
    """In-place all-reduce; a no-op in a single process."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor, op=op)
    return tensor


def average_tensors_(tensors: list[torch.Tensor]) -> None:
    """Make floating tensors identical on every rank: their mean across ranks."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return
    floats = [t for t in tensors if t.is_floating_point()]
    if not floats:
        return
    flat = torch.cat([t.detach().reshape(-1).float() for t in floats])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    offset = 0
    for t in floats:
        t.copy_(flat[offset:offset + t.numel()].view_as(t))
        offset += t.numel()


def broadcast_object(obj, src: int = 0):
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def gather_objects(obj) -> list:
    """Every rank's obj, on every rank (rank order)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()
