"""The run assembly: config + DistEnv → loaders, augmentation, wrapped model, EMA, optimizer, schedule.

Training, evaluation, prediction and the benchmarks build through here, so they run one code.
Set-up order: build → whitening init from data → channels_last → SyncBN → DDP → torch.compile.
Every derived number (per-rank batch, steps, precision) is resolved once into a `RunPlan`.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from cifar_dist.augment.pipeline import EvalTransform, TrainAugment
from cifar_dist.augment.recipe import check_loader_support, device_part
from cifar_dist.cifar10 import NUM_CLASSES
from cifar_dist.config import Config
from cifar_dist.errors import ConfigError
from cifar_dist.data.loaders import GpuLoader, build_loader
from cifar_dist.engine.distributed import DistEnv
from cifar_dist.engine.ema import EMA, NoEMA
from cifar_dist.engine.optim import build_optimizer, check_optimizer_fits, sgd_rates
from cifar_dist.engine.run_log.tensorboard_sink import check_tensorboard
from cifar_dist.hardware import device_name
from cifar_dist.models import build_model
from cifar_dist.models.summary import training_flops_per_image
from cifar_dist.peak_flops import find_peak, peak_tflops



@dataclass
class RunPlan:
    """What the config resolved to on this launch; printed by rank 0 and saved as plan.json."""

    world_size: int
    device: str
    device_name: str
    loader: str
    train_images: int
    eval_split: str
    eval_images: int
    global_batch_size: int
    micro_batch_size: int
    grad_accum_steps: int
    steps_per_epoch: int
    epochs: float
    total_steps: int
    optimizer: str
    sgd_lr: float
    amp_dtype: str
    grad_scaler: bool
    sync_bn: bool
    channels_last: bool
    compile: str
    ema: str
    model: str
    parameters: int
    train_flops_per_image: int = 0  # 3 × the forward FLOPs of one image (models/summary.py), counted once here
    peak_tflops: float = 0.0  # dense peak of one device at the training dtype (peak_flops.py); 0: unknown
    mfu: str = ""  # what an epoch's MFU is measured against, or why there is none
    stop_step: int = 0  # the step this launch stops at: total_steps, or train.max_steps when that comes first
    run_dir: str = ""

    def lines(self) -> list[str]:
        """Aligned 'key  value' lines for the terminal."""
        rows = dataclasses.asdict(self)
        width = max(map(len, rows))
        return [f"  {key:<{width}}  {value}" for key, value in rows.items()]


def per_rank_batch_size(global_batch_size: int, world_size: int, grad_accum_steps: int) -> int:
    """The micro-batch each rank loads; the config states the global batch of one optimizer step."""
    parts = world_size * grad_accum_steps
    if global_batch_size % parts:
        raise ConfigError(f"train.global_batch_size={global_batch_size} is not divisible by world size "
                          f"{world_size} × train.grad_accum_steps {grad_accum_steps}; pick a multiple of {parts}")
    return global_batch_size // parts


def resolve_sync_bn(setting: str, device: torch.device, world_size: int) -> bool:
    if setting == "on" and device.type != "cuda":
        raise ConfigError("train.sync_bn=on needs CUDA devices (SyncBatchNorm does not run on CPU); "
                          "use train.sync_bn=auto or off")
    return setting == "on" or (setting == "auto" and device.type == "cuda" and world_size > 1)


def resolve_amp_dtype(amp: bool, setting: str, device: torch.device) -> torch.dtype | None:
    """None (no AMP), bf16 where supported, fp16 otherwise (with a gradient scaler)."""
    if not amp:
        return None
    if setting == "fp16":
        return torch.float16
    if setting == "bf16" or device.type == "cpu" or torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float16


def autocast_context(device: torch.device, dtype: torch.dtype | None):
    """A factory of autocast contexts for this precision (a no-op context without AMP)."""
    if dtype is None:
        return contextlib.nullcontext
    return lambda: torch.autocast(device.type, dtype=dtype)


def peak_dtype(amp_dtype: torch.dtype | None, device: torch.device) -> str:
    """The peak an MFU compares with: the autocast dtype's, else TF32 where cuDNN may use it for float32
    convolutions (its default on Ampere and later), else plain float32."""
    if amp_dtype is not None:
        return {torch.bfloat16: "bf16", torch.float16: "fp16"}[amp_dtype]
    return "tf32" if device.type == "cuda" and torch.backends.cudnn.allow_tf32 else "fp32"


def resolve_peak(name: str, dtype: str, world_size: int) -> tuple[float, str]:
    """(dense peak TFLOPS of one device, 0 when unknown; the plan's words for it)."""
    tflops = peak_tflops(name, dtype)
    if tflops is None and dtype == "tf32":  # no TF32 (Volta, Turing): float32 runs as float32
        dtype, tflops = "fp32", peak_tflops(name, "fp32")
    if tflops is None:
        return 0.0, (f"unknown peak for {name} at {dtype}, so no MFU (cifar_dist/peak_flops.py lists the known "
                     "devices and dtypes)")
    return tflops, (f"against {tflops:g} TFLOPS per device ({find_peak(name).label}, {dtype} dense, vendor datasheet) "
                    f"x {world_size}")


def preflight(cfg: Config) -> None:
    """The checks beyond the config's own: the model builds and has what the optimizer needs, the loader
    supports the recipe, an optional package a logging key asks for is installed."""
    if cfg.model.num_classes != NUM_CLASSES:
        raise ConfigError(f"model.num_classes={cfg.model.num_classes}, but CIFAR-10 has {NUM_CLASSES} classes: the "
                          f"labels would not fit the head; set model.num_classes={NUM_CLASSES}")
    check_optimizer_fits(build_model(cfg.model), cfg.train)
    check_loader_support(cfg.augment, cfg.data.loader)
    check_tensorboard(cfg.logging.tensorboard)


def build_train_input(cfg: Config, env: DistEnv, micro_batch: int) -> tuple[object, TrainAugment]:
    """The training input path: this rank's loader and the device's part of the augmentation recipe."""
    check_loader_support(cfg.augment, cfg.data.loader)
    loader = build_loader(cfg.data, "train", micro_batch, train=True, seed=cfg.train.seed, rank=env.rank,
                          world_size=env.world_size, device=env.device, channels_last=cfg.train.channels_last,
                          host_augment=cfg.augment)
    augment = TrainAugment(device_part(cfg.augment, cfg.data.loader), cfg.model.num_classes,
                           cfg.train.channels_last, seed=cfg.train.seed)
    return loader, augment


def build_eval_input(cfg: Config, env: DistEnv, split: str, batch_size: int) -> tuple[object, EvalTransform]:
    """An evaluation loader over one split (each rank a contiguous shard, every image once) and its transform."""
    loader = build_loader(cfg.data, split, batch_size, train=False, rank=env.rank, world_size=env.world_size,
                          device=env.device, channels_last=cfg.train.channels_last)
    return loader, EvalTransform(cfg.train.channels_last)


def build_array_input(cfg: Config, env: DistEnv, images: np.ndarray, batch_size: int,
                      labels: np.ndarray | None = None) -> tuple[GpuLoader, EvalTransform]:
    """An evaluation loader over NHWC uint8 images in memory (a file to predict), sharded like a split."""
    labels = np.zeros(len(images), dtype=np.int64) if labels is None else labels
    loader = GpuLoader(images, labels, batch_size, train=False, seed=0, rank=env.rank, world_size=env.world_size,
                       device=env.device, channels_last=cfg.train.channels_last)
    return loader, EvalTransform(cfg.train.channels_last)


@dataclass
class Run:
    """Everything a training loop drives; `model` is the bare module, `net` the wrapped one."""

    plan: RunPlan
    train_loader: object
    eval_loader: object
    augment: TrainAugment
    eval_transform: EvalTransform
    model: nn.Module
    net: nn.Module
    ema: EMA | NoEMA
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    autocast: object
    loss_scale: float  # multiplies the per-image loss sum so that DDP's average gives the configured reduction


def build_model_for(cfg: Config, device: torch.device, channels_last: bool, sync_bn: bool = False,
                    whitening_images=None) -> nn.Module:
    """The bare model on device: built, whitened from data when it has a whitening layer, laid out."""
    torch.manual_seed(cfg.train.seed)  # the same initial weights for a given seed, whatever the world size
    model = build_model(cfg.model).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    if whitening_images is not None and hasattr(model, "init_from_data"):
        model.init_from_data(whitening_images())
    return nn.SyncBatchNorm.convert_sync_batchnorm(model) if sync_bn else model


def wrap(model: nn.Module, env: DistEnv, compile_model: bool, compile_mode: str) -> nn.Module:
    """DDP (with several ranks), then torch.compile, as PyTorch recommends."""
    net = model
    if env.distributed:
        # Per-rank BN statistics (no buffer broadcast); they are averaged before eval and save.
        # broadcast_buffers=False is deprecated, but its replacement still syncs buffers at init,
        # which would overwrite the per-rank buffers an exact resume puts back.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*broadcast_buffers.*", category=FutureWarning)
            device_ids = [env.device.index] if env.device.type == "cuda" else None
            net = DistributedDataParallel(model, device_ids=device_ids, broadcast_buffers=False)
    if compile_model:
        net = torch.compile(net, mode=compile_mode)
    return net


def build_run(cfg: Config, env: DistEnv) -> Run:
    """Assemble a training run on this rank (every rank calls it; DDP start-up is collective)."""
    tc, device = cfg.train, env.device
    preflight(cfg)
    micro_batch = per_rank_batch_size(tc.global_batch_size, env.world_size, tc.grad_accum_steps)
    sync_bn = resolve_sync_bn(tc.sync_bn, device, env.world_size)
    amp_dtype = resolve_amp_dtype(tc.amp, tc.amp_dtype, device)
    if tc.deterministic:
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    elif device.type == "cuda":
        torch.backends.cudnn.benchmark = True

    train_loader, augment = build_train_input(cfg, env, micro_batch)
    eval_split = "val" if cfg.data.val_fraction > 0 else "test"
    eval_loader, eval_transform = build_eval_input(cfg, env, eval_split, micro_batch)
    steps_per_epoch = len(train_loader) // tc.grad_accum_steps
    if steps_per_epoch == 0:
        raise ConfigError(f"the train split gives {train_loader.num_samples} images per rank, fewer than one "
                          f"step of train.global_batch_size={tc.global_batch_size}; lower the batch size")
    total_steps = math.ceil(steps_per_epoch * tc.epochs)

    def whitening_images() -> torch.Tensor:  # epoch-0 order; DDP later broadcasts rank 0's result
        images = []
        for batch, _ in train_loader:
            images.append(eval_transform(batch))
            if sum(len(x) for x in images) >= tc.whiten_images:
                break
        return torch.cat(images)[:tc.whiten_images]

    model = build_model_for(cfg, device, tc.channels_last, sync_bn, whitening_images)
    train_flops = training_flops_per_image(model, device)
    name = device_name(device)
    peak, mfu_words = resolve_peak(name, peak_dtype(amp_dtype, device), env.world_size)
    optimizer, scheduler = build_optimizer(model, tc, tc.global_batch_size, steps_per_epoch, total_steps)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    net = wrap(model, env, tc.compile, tc.compile_mode)
    # After DDP's start-up broadcast: the EMA starts from rank 0's weights on every rank, frozen
    # ones (the whitening filters, from each rank's own images) included.
    ema = NoEMA() if tc.ema_decay == 0 else EMA(
        model, tc.ema_decay, tc.ema_every, tc.ema_ramp, start_step=round(tc.ema_start_epochs * steps_per_epoch),
        total_steps=total_steps, lookahead=tc.ema_lookahead)
    loss_scale = env.world_size if tc.loss_reduction == "sum" else 1 / (micro_batch * tc.grad_accum_steps)
    plan = RunPlan(
        world_size=env.world_size, device=str(device), device_name=name, loader=cfg.data.loader,
        train_images=train_loader.split_size, eval_split=eval_split, eval_images=eval_loader.split_size,
        global_batch_size=tc.global_batch_size, micro_batch_size=micro_batch, grad_accum_steps=tc.grad_accum_steps,
        steps_per_epoch=steps_per_epoch, epochs=tc.epochs, total_steps=total_steps,
        optimizer=(f"muon (lr {tc.muon.lr}) on the conv filters, sgd on the rest" if tc.optimizer == "muon"
                   else "sgd"),
        sgd_lr=sgd_rates(tc, tc.global_batch_size)[0],
        amp_dtype=str(amp_dtype).removeprefix("torch.") if amp_dtype else "off", grad_scaler=scaler.is_enabled(),
        sync_bn=sync_bn, channels_last=tc.channels_last, compile=tc.compile_mode if tc.compile else "off",
        ema=(f"decay {tc.ema_decay} every {tc.ema_every} ramp {tc.ema_ramp}"
             f"{' lookahead' if tc.ema_lookahead else ''}" if ema.enabled else "off"),
        model=cfg.model.name, parameters=sum(p.numel() for p in model.parameters() if p.requires_grad),
        train_flops_per_image=train_flops, peak_tflops=peak, mfu=mfu_words,
        stop_step=min(total_steps, tc.max_steps) if tc.max_steps else total_steps)
    return Run(plan, train_loader, eval_loader, augment, eval_transform, model, net, ema, optimizer, scheduler,
               scaler, autocast_context(device, amp_dtype), loss_scale)
