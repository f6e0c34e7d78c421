"""Model summary: trainable parameters, forward FLOPs per image, peak memory of one training step.

Peak memory is the most bytes held by tensors at any moment of one forward + backward pass
(float32, train mode) at the given batch size, counting weights, buffers, the input batch and the
gradients, but no optimizer state. On CUDA it is `torch.cuda.max_memory_allocated`; on the CPU,
which has no allocator statistics, a dispatch mode adds up the storages every op creates and
subtracts them when they are freed: the same quantity without the CUDA allocator's 512-byte
rounding, and without scratch buffers a kernel frees before it returns.
"""
from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import FlopCounterMode
from torch.utils.weak import WeakIdKeyDictionary

from cifar_dist.config import ModelConfig
from cifar_dist.models import build_model

IMAGE_SHAPE = (3, 32, 32)


class LiveTensorBytes(TorchDispatchMode):
    """Track the bytes of tensor storages created inside the mode that are still alive, and their peak."""

    def __init__(self):
        super().__init__()
        self.live_bytes = 0
        self.peak_bytes = 0
        self._tracked = WeakIdKeyDictionary()  # storage -> weakref whose callback releases its bytes

    def _release(self, nbytes: int, _ref) -> None:
        self.live_bytes -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_leaves(out):
            if not isinstance(tensor, torch.Tensor):
                continue
            storage = tensor.untyped_storage()
            if storage in self._tracked:  # in-place ops and views reuse a storage
                continue
            nbytes = storage.nbytes()
            self._tracked[storage] = weakref.ref(storage, lambda ref, n=nbytes: self._release(n, ref))
            self.live_bytes += nbytes
            self.peak_bytes = max(self.peak_bytes, self.live_bytes)
        return out


def count_parameters(model: torch.nn.Module) -> int:
    """Number of trainable parameters (frozen ones, like the fast net's whitening filters, excluded)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def forward_flops_per_image(model: torch.nn.Module, device) -> int:
    """FLOPs of one eval-mode forward pass on one image, counting 2 per multiply-accumulate; the model is left
    in the mode it was in."""
    counter = FlopCounterMode(display=False)
    was_training = model.training
    try:
        with counter, torch.no_grad():
            model.eval()(torch.zeros(1, *IMAGE_SHAPE, device=device))
    finally:
        model.train(was_training)
    return counter.get_total_flops()


def training_flops_per_image(model: torch.nn.Module, device) -> int:
    """FLOPs of one training step per image: the forward pass and a backward pass of twice its FLOPs (the
    gradients of the activations and of the weights), the usual 3 × forward of MFU figures."""
    return 3 * forward_flops_per_image(model, device)


def _training_step(model: torch.nn.Module, images: torch.Tensor) -> None:
    model.train()(images).float().sum().backward()


def peak_training_memory_bytes(model: torch.nn.Module, batch_size: int, device) -> int:
    """Peak bytes held by tensors during one forward + backward pass at batch_size (see module docstring)."""
    images = torch.randn(batch_size, *IMAGE_SHAPE, device=device)
    model.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        _training_step(model, images)
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device)
    resident = sum(t.nbytes for t in [*model.parameters(), *model.buffers(), images])
    with LiveTensorBytes() as tracker:
        _training_step(model, images)
    return resident + tracker.peak_bytes


def summarize(cfg: ModelConfig, batch_size: int = 128, device="cpu") -> dict:
    """Parameters, forward FLOPs per image and peak training-step memory of the model cfg describes."""
    device = torch.device(device)
    model = build_model(cfg).to(device)
    return {
        "name": cfg.name,
        "parameters": count_parameters(model),
        "flops_per_image": forward_flops_per_image(model, device),
        "peak_memory_bytes": peak_training_memory_bytes(model, batch_size, device),
        "batch_size": batch_size,
        "device": str(device),
    }


def format_summary(cfg: ModelConfig, info: dict) -> str:
    """A few aligned lines for the terminal."""
    rows = [
        ("model", cfg.name),
        ("trainable parameters", f"{info['parameters']:,}"),
        ("forward FLOPs / image", f"{info['flops_per_image'] / 1e9:.3f} G ({info['flops_per_image']:,})"),
        (
            "peak training memory",
            f"{info['peak_memory_bytes'] / 2**20:.1f} MiB "
            f"(forward + backward, fp32, batch {info.get('batch_size', '?')} on {info.get('device', '?')})",
        ),
    ]
    width = max(len(label) for label, _ in rows)
    return "\n".join(f"{label:<{width}}  {value}" for label, value in rows)
