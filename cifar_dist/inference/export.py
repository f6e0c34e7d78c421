"""`cifar-dist export`: a checkpoint as a deployable ONNX or TorchScript model, checked against eager.

The exported model takes raw pixels, uint8 N × 3 × 32 × 32 (a CIFAR row reshaped to (3, 32, 32)),
and returns logits N × classes: the evaluation transform (scale to [0, 1], normalise with the
CIFAR-10 mean and std) is part of it. It is written under a temporary name, run beside the eager
model on a batch of pixels (ONNX with onnxruntime when installed, else checked with
`onnx.checker`), and renamed into place only when the largest difference is within tolerance.
"""
from __future__ import annotations

import importlib.util
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from cifar_dist.atomic import atomic_write
from cifar_dist.augment import color
from cifar_dist.errors import ConfigError
from cifar_dist.inference import EXPORT_FORMATS
from cifar_dist.inference.weights import load_model
from cifar_dist.outputs import check_writable

SUFFIXES = dict(zip(EXPORT_FORMATS, (".onnx", ".torchscript.pt")))
ONNX_OPSET = 17
RELATIVE_TOLERANCE = 1e-4  # of the largest logit: float32 kernels differ in summation order, not more
SECOND_BATCH = 7  # with --dynamic-batch, the export is also run on a batch of this many images


class ExportMismatch(RuntimeError):
    """The exported model does not compute what the eager one does."""


class PixelClassifier(nn.Module):
    """uint8 pixels → logits: the evaluation transform, then the model."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        mean, std = color.channel_stats("cpu")
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model(color.normalize(color.to_float01(pixels), self.mean, self.std))


def _pixels(batch_size: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (batch_size, 3, 32, 32), dtype=torch.uint8, generator=generator)


def _torchscript(classifier: nn.Module, example: torch.Tensor, path: Path, _dynamic_batch: bool):
    with warnings.catch_warnings():  # deprecated in favour of torch.export, still what libtorch loads
        warnings.simplefilter("ignore", FutureWarning)
        traced = torch.jit.trace(classifier, example)
        torch.jit.save(traced, str(path))
        loaded = torch.jit.load(str(path))
    return lambda pixels: loaded(pixels).numpy(), "run with torch.jit.load"


def _onnx(classifier: nn.Module, example: torch.Tensor, path: Path, dynamic_batch: bool):
    if importlib.util.find_spec("onnx") is None:
        raise ConfigError("--format onnx needs the 'onnx' package: pip install onnx (and onnxruntime to run the "
                          "check); --format torchscript needs nothing more")
    dynamic_axes = {"pixels": {0: "batch"}, "logits": {0: "batch"}} if dynamic_batch else None
    with warnings.catch_warnings():  # the TorchScript-based exporter: it needs onnx only, not onnxscript
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(classifier, (example,), str(path), dynamo=False, input_names=["pixels"],
                          output_names=["logits"], dynamic_axes=dynamic_axes, opset_version=ONNX_OPSET)
    if importlib.util.find_spec("onnxruntime") is None:
        import onnx

        onnx.checker.check_model(str(path))
        return None, "checked with onnx.checker, not run: pip install onnxruntime to compare its outputs"
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return lambda pixels: session.run(None, {"pixels": pixels.numpy()})[0], "run with onnxruntime"


def export(checkpoint: Path, fmt: str, out: Path | None = None, weights: str | None = None,
           dynamic_batch: bool = False, batch_size: int = 1, overrides: list[str] = (), log=print) -> Path:
    """Export, run beside eager, and rename into place; ExportMismatch (nothing written) when they differ."""
    if out:
        check_writable(out, "--out")
    loaded = load_model(checkpoint, weights, overrides)
    checkpoint = Path(checkpoint)
    out = Path(out) if out else checkpoint.parent / f"{checkpoint.stem}-{loaded.weights}{SUFFIXES[fmt]}"
    check_writable(out, "the export")
    classifier = PixelClassifier(loaded.model).eval()
    batches = [_pixels(batch_size, seed=0)] + ([_pixels(SECOND_BATCH, seed=1)] if dynamic_batch else [])
    report = {}

    def write(tmp: Path) -> None:
        run, how = (_onnx if fmt == "onnx" else _torchscript)(classifier, batches[0], tmp, dynamic_batch)
        report["how"] = how
        if run is None:
            return
        differences, scale = [], 0.0
        with torch.no_grad():
            for pixels in batches:
                eager = classifier(pixels).numpy()
                differences.append(float(np.abs(run(pixels) - eager).max()))
                scale = max(scale, float(np.abs(eager).max()))
        report["difference"], report["scale"] = max(differences), scale
        if report["difference"] > RELATIVE_TOLERANCE * max(scale, 1.0):
            raise ExportMismatch(f"the {fmt} export differs from the eager model by up to {report['difference']:.3g} "
                                 f"(logits up to {scale:.3g}); nothing written to {out}")

    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, write, fsync=False)
    sizes = " and ".join(str(len(b)) for b in batches)
    shape = "dynamic batch" if dynamic_batch else f"batch {batch_size}"
    log(f"exported {out} ({fmt}, {loaded.cfg.model.name}, {loaded.weights} weights, {shape}; input uint8 pixels "
        f"N×3×32×32, output logits)")
    if "difference" in report:
        log(f"{report['how']} beside eager on batches of {sizes}: largest difference {report['difference']:.3g} "
            f"(logits up to {report['scale']:.3g})")
    else:
        log(f"note: {report['how']}")
    return out
