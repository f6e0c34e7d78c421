"""The training loop: the same code on one CPU, one GPU, many GPUs and many nodes.

Set-up order: build → channels_last → SyncBN → DDP → torch.compile. Randomness is derived from
(seed, rank, epoch, step) at every step, so a resumed run needs no RNG stream from the past and
continues bitwise like an uninterrupted one (with train.deterministic=true).
"""
from __future__ import annotations

import contextlib
import math
import os
import random
import resource
import signal
import time
import warnings
from datetime import datetime
from itertools import islice
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import cifar_dist
from cifar_dist.augment.mix import soft_target_cross_entropy
from cifar_dist.augment.pipeline import EvalTransform, TrainAugment, make_generator, on_device_remainder
from cifar_dist.config import Config, ConfigError, config_to_dict
from cifar_dist.data.cifar import CLASS_NAMES
from cifar_dist.data.loaders import build_loader
from cifar_dist.engine import checkpoint
from cifar_dist.engine.distributed import DistEnv, all_reduce_, average_tensors_, broadcast_object, gather_objects
from cifar_dist.engine.ema import EMA
from cifar_dist.engine.evaluation import evaluate
from cifar_dist.engine.logging import RunLogger
from cifar_dist.models import build_model, init_from_data

EXIT_PREEMPTED = 75  # stopped by SIGTERM/SIGUSR2 after writing last.pt: run again to resume
EXIT_DIVERGED = 3  # too many consecutive non-finite losses; last good checkpoint kept
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR2)
WHITENING_IMAGES = 5000


class TrainingDiverged(RuntimeError):
    pass


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


def amp_dtype(cfg_amp: bool, cfg_dtype: str, device: torch.device) -> torch.dtype | None:
    """None (no AMP), bf16 where supported, fp16 otherwise (with a gradient scaler)."""
    if not cfg_amp:
        return None
    if cfg_dtype == "fp16":
        return torch.float16
    if cfg_dtype == "bf16" or device.type == "cpu" or torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float16


def lr_factor(step: int, total_steps: int, warmup_steps: int, schedule: str, peak_fraction: float,
              min_ratio: float) -> float:
    """Multiplier of the base lr at an optimizer step (0-based), for LambdaLR."""
    if schedule == "triangular":
        peak = max(1, int(peak_fraction * total_steps))
        if step < peak:
            return (step + 1) / peak
        return max(0.0, (total_steps - step) / max(1, total_steps - peak))
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on weights of convs and linears; none on BN parameters and biases."""
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (no_decay if param.ndim <= 1 else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def float_buffers(module: nn.Module) -> list[torch.Tensor]:
    return [b for b in module.buffers() if b.is_floating_point()]


def resolve_run_dir(cfg: Config, env: DistEnv) -> Path:
    """run.dir, or runs/<name>-<timestamp>; a torchrun restart or Slurm requeue finds its own dir again."""
    if cfg.run.dir:
        if env.is_main:
            Path(cfg.run.dir).mkdir(parents=True, exist_ok=True)
        return Path(cfg.run.dir)
    job_id = os.environ.get("SLURM_JOB_ID") or os.environ.get("TORCHELASTIC_RUN_ID", "")
    run_dir = None
    if env.is_main:
        runs = Path("runs")
        for marker in sorted(runs.glob(f"{cfg.run.name}-*/job_id")) if job_id else []:
            if marker.read_text().strip() == job_id:
                run_dir = marker.parent
        if run_dir is None:
            run_dir = runs / f"{cfg.run.name}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
            run_dir.mkdir(parents=True, exist_ok=True)
            if job_id:
                (run_dir / "job_id").write_text(job_id + "\n")
    return Path(broadcast_object(str(run_dir)))


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


class Trainer:
    def __init__(self, cfg: Config, env: DistEnv, log=print):
        self.cfg, self.env, self.device = cfg, env, env.device
        self.log = log if env.is_main else (lambda *a, **k: None)
        tc = cfg.train
        self.micro_batch = per_rank_batch_size(tc.global_batch_size, env.world_size, tc.grad_accum_steps)
        self.sync_bn = resolve_sync_bn(tc.sync_bn, self.device, env.world_size)
        if tc.deterministic:
            torch.use_deterministic_algorithms(True)
            torch.backends.cudnn.benchmark = False
        elif self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        self.run_dir = resolve_run_dir(cfg, env)

        self.train_loader = build_loader(cfg.data, "train", self.micro_batch, train=True, seed=tc.seed,
                                         rank=env.rank, world_size=env.world_size, device=self.device,
                                         augment=cfg.augment)
        eval_split = "val" if cfg.data.val_fraction > 0 else "test"
        if eval_split == "test":
            self.log("data.val_fraction=0: no val split, so each epoch is evaluated on the test split")
        self.val_loader = build_loader(cfg.data, eval_split, self.micro_batch, train=False, rank=env.rank,
                                       world_size=env.world_size, device=self.device)
        self.steps_per_epoch = len(self.train_loader) // tc.grad_accum_steps
        if self.steps_per_epoch == 0:
            raise ConfigError(f"the train split gives {self.train_loader.num_samples} images per rank, fewer than "
                              f"one step of train.global_batch_size={tc.global_batch_size}; lower the batch size")
        self.total_steps = self.steps_per_epoch * tc.epochs
        augment_cfg = cfg.augment
        if getattr(self.train_loader, "host_augmented", False):  # torchvision baseline: PIL did it already
            augment_cfg = on_device_remainder(cfg.augment)
        self.augment = TrainAugment(augment_cfg, cfg.model.num_classes, tc.channels_last, seed=tc.seed)
        self.eval_transform = EvalTransform(tc.channels_last)
        self.amp_dtype = amp_dtype(tc.amp, tc.amp_dtype, self.device)

        torch.manual_seed(tc.seed)  # the same initial weights for a given seed, whatever the world size
        self.model = self._build_model()
        self.ema = EMA(self.model, tc.ema_decay, tc.ema_every, tc.ema_warmup_steps,
                       lookahead=tc.ema_lookahead) if tc.ema_decay > 0 else None
        self.optimizer = torch.optim.SGD(parameter_groups(self.model, tc.weight_decay), lr=tc.lr,
                                         momentum=tc.momentum, nesterov=tc.nesterov and tc.momentum > 0)
        warmup_steps = int(tc.warmup_epochs * self.steps_per_epoch)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda step: lr_factor(
            step, self.total_steps, warmup_steps, tc.schedule, tc.peak_epoch_fraction, tc.min_lr_ratio))
        self.scaler = torch.amp.GradScaler(self.device.type) if self.amp_dtype == torch.float16 else None

        self.epoch, self.global_step, self.nonfinite_streak, self.nonfinite_total = 0, 0, 0, 0
        self.best = {"model": -1.0, "ema": -1.0}
        self.history: list[dict] = []
        self.partial_epoch: dict = {}
        self.wandb_run_id = None
        self._restore(checkpoint.load_resume_state(self.run_dir, tc.resume, log=self.log))
        self.net = self._wrap(self.model)
        self._restore_rank_local()
        self.logger = RunLogger(self.run_dir, cfg.logging, enabled=env.is_main, config_dict=config_to_dict(cfg),
                                wandb_run_id=self.wandb_run_id)
        self.wandb_run_id = self.logger.wandb_run_id
        if self.history:
            self.logger.load_history(self.history)
        self.signal_received = False  # set by the handler; acted on only once all ranks agree
        self.last_checkpoint_time = time.monotonic()

    # ---- set-up -------------------------------------------------------------------------------
    def _build_model(self) -> nn.Module:
        try:
            model = build_model(self.cfg.model).to(self.device)
        except ValueError as err:  # a model option out of range, named by the builder
            raise ConfigError(str(err)) from None
        if self.cfg.train.channels_last:
            model = model.to(memory_format=torch.channels_last)
        if not hasattr(model, "init_from_data"):
            return self._convert_bn(model)
        images = []
        for batch, _ in self.train_loader:  # epoch-0 order; DDP later broadcasts rank 0's result
            images.append(self.eval_transform(batch))
            if sum(len(x) for x in images) >= WHITENING_IMAGES:
                break
        init_from_data(model, torch.cat(images)[:WHITENING_IMAGES])
        return self._convert_bn(model)

    def _convert_bn(self, model: nn.Module) -> nn.Module:
        return nn.SyncBatchNorm.convert_sync_batchnorm(model) if self.sync_bn else model

    def _wrap(self, model: nn.Module) -> nn.Module:
        net = model
        if self.env.distributed:
            # Per-rank BN statistics (no buffer broadcast); they are averaged before eval and save.
            # broadcast_buffers=False is deprecated, but its replacement still syncs buffers at init,
            # which would overwrite the per-rank buffers an exact resume puts back.
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*broadcast_buffers.*", category=FutureWarning)
                device_ids = [self.device.index] if self.device.type == "cuda" else None
                net = DistributedDataParallel(model, device_ids=device_ids, broadcast_buffers=False)
        if self.cfg.train.compile:
            net = torch.compile(net, mode=self.cfg.train.compile_mode)
        return net

    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    # ---- checkpoints --------------------------------------------------------------------------
    def _state(self) -> dict:
        """Everything needed to continue exactly; model and EMA with BN buffers averaged over ranks."""
        rank_local = gather_objects({
            "model": [b.cpu() for b in float_buffers(self.model)],
            "ema": [b.cpu() for b in float_buffers(self.ema.module)] if self.ema else [],
        })
        model_state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        ema_state = self.ema.state_dict() if self.ema else None
        if ema_state is not None:
            ema_state["module"] = {k: v.detach().clone() for k, v in ema_state["module"].items()}
        average_tensors_([v for v in model_state.values()])
        if ema_state is not None:
            average_tensors_(list(ema_state["module"].values()))
        return {
            "format_version": checkpoint.FORMAT_VERSION,
            "package_version": cifar_dist.__version__,
            "config": config_to_dict(self.cfg),
            "epoch": self.epoch,
            "global_step": self.global_step,
            "model": model_state,
            "ema": ema_state,
            "rank_local": rank_local,
            "world_size": self.env.world_size,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler else None,
            "nonfinite": (self.nonfinite_streak, self.nonfinite_total),
            "best": dict(self.best),
            "history": list(self.history),
            "partial_epoch": dict(self.partial_epoch),
            "wandb_run_id": self.wandb_run_id,
            "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
                    "cuda": torch.cuda.get_rng_state_all() if self.device.type == "cuda" else None},
        }

    def save(self, names: tuple[str, ...]) -> None:
        state = self._state()  # collective: every rank takes part
        if self.env.is_main:
            for name in names:
                checkpoint.save_atomic(state, self.run_dir / name, keep_previous=name == checkpoint.LAST)

    def _restore(self, state: dict | None) -> None:
        if state is None:
            return
        model_cfg = state["config"]["model"]
        if model_cfg != config_to_dict(self.cfg)["model"]:
            raise checkpoint.CheckpointError(
                f"the checkpoint was trained with model settings {model_cfg}, but the config asks for "
                f"{config_to_dict(self.cfg)['model']}; resume with the same model.* keys or train.resume=never")
        try:
            self.model.load_state_dict(state["model"])
            if self.ema and state["ema"]:
                self.ema.load_state_dict(state["ema"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            if self.scaler and state["scaler"]:
                self.scaler.load_state_dict(state["scaler"])
        except (RuntimeError, KeyError, ValueError) as err:
            raise checkpoint.CheckpointError(f"checkpoint does not fit this run: {err}") from None
        self.epoch, self.global_step = state["epoch"], state["global_step"]
        self.nonfinite_streak, self.nonfinite_total = state["nonfinite"]
        self.best, self.history = state["best"], state["history"]
        self.partial_epoch, self.wandb_run_id = state["partial_epoch"], state["wandb_run_id"]
        self._rank_local = state["rank_local"] if state["world_size"] == self.env.world_size else None
        if state["world_size"] != self.env.world_size:
            self.log(f"note: resuming a run saved with world size {state['world_size']} on world size "
                     f"{self.env.world_size}: the per-rank batch and data order change; BN statistics start "
                     "from their cross-rank average")
        self.log(f"resumed from {self.run_dir} at epoch {self.epoch}, step {self.global_step}")

    def _restore_rank_local(self) -> None:
        """Per-rank BN buffers, put back after DDP's start-up broadcast (exact resume on CPU ranks)."""
        local = getattr(self, "_rank_local", None)
        if not local:
            return
        mine = local[self.env.rank]
        with torch.no_grad():
            for buffer, saved in zip(float_buffers(self.model), mine["model"]):
                buffer.copy_(saved)
            if self.ema:
                for buffer, saved in zip(float_buffers(self.ema.module), mine["ema"]):
                    buffer.copy_(saved)

    # ---- training -----------------------------------------------------------------------------
    def _request_stop(self, signum, _frame) -> None:
        self.signal_received = True
        self.log(f"received {signal.Signals(signum).name}: finishing the step, then writing last.pt")

    def _agree(self, grad_norm: torch.Tensor | None = None) -> tuple[bool, bool, bool]:
        """(gradient non-finite, stop, checkpoint due) agreed by all ranks, so all take the same branch.

        One small all-reduce and one host sync per step; the norm's check stays on the device.
        """
        interval_s = self.cfg.train.checkpoint_interval_min * 60
        due = interval_s > 0 and time.monotonic() - self.last_checkpoint_time > interval_s
        flags = torch.tensor([0.0, self.signal_received, due], dtype=torch.float32, device=self.device)
        if grad_norm is not None:
            flags[0] = (~torch.isfinite(grad_norm)).float()
        all_reduce_(flags, op=torch.distributed.ReduceOp.MAX)
        return tuple(bool(f) for f in flags.tolist())

    def _seed_step(self, micro_step: int) -> torch.Generator:
        """Dropout and augmentation randomness of one micro-step, from (seed, rank, epoch, step)."""
        tc, rank = self.cfg.train, self.env.rank
        torch.manual_seed(make_generator(tc.seed, rank, self.epoch, -1 - micro_step, "cpu").initial_seed())
        return make_generator(tc.seed, rank, self.epoch, micro_step, self.device)

    def _optimizer_step(self) -> tuple[bool, bool]:
        """Unscale, clip, step (skipped when the gradient is not finite); (stop, checkpoint due) agreed."""
        tc = self.cfg.train
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        params = [p for p in self.model.parameters() if p.grad is not None]
        max_norm = tc.grad_clip_norm if tc.grad_clip_norm > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        nonfinite, stop, due = self._agree(grad_norm)
        if nonfinite:
            if self.scaler:
                self.scaler.update()  # lowers the scale, as after any fp16 overflow
            self.nonfinite_streak += 1
            self.nonfinite_total += 1
            self.log(f"warning: non-finite loss or gradient at step {self.global_step}: step skipped "
                     f"({self.nonfinite_streak} in a row)")
        else:
            if self.scaler:
                self.scaler.step(self.optimizer)
                self.scaler.update()
            else:
                self.optimizer.step()
            self.nonfinite_streak = 0
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.global_step += 1
        if self.ema and not nonfinite:
            self.ema.update(self.model, self.global_step)
        return stop, due

    def train_epoch(self) -> tuple[str, dict | None]:
        """Train from the current position: ("done", epoch sums) or ("signal" | "max_steps", None)."""
        tc = self.cfg.train
        accum = tc.grad_accum_steps
        start_step = self.global_step - self.epoch * self.steps_per_epoch
        self.train_loader.set_epoch(self.epoch)
        self.net.train()
        sums = self.partial_epoch or {"loss": 0.0, "correct": 0, "count": 0, "seconds": 0.0}
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        correct = torch.zeros((), dtype=torch.int64, device=self.device)
        count = 0
        t0 = time.perf_counter()
        self.logger.start_epoch(self.epoch + 1, self.steps_per_epoch)
        batches = islice(self.train_loader, start_step * accum, self.steps_per_epoch * accum)
        for micro_step, (images, labels) in enumerate(batches, start=start_step * accum):
            generator = self._seed_step(micro_step)
            inputs, targets = self.augment(images, labels, generator, epoch=self.epoch)
            last_micro = (micro_step + 1) % accum == 0
            sync = contextlib.nullcontext() if last_micro or not self.env.distributed else self.net.no_sync()
            with sync:
                with self.autocast():
                    logits = self.net(inputs)
                loss = soft_target_cross_entropy(logits.float(), targets, tc.label_smoothing)
                scaled = loss / accum
                (self.scaler.scale(scaled) if self.scaler else scaled).backward()
            loss_sum += loss.detach().double() * len(labels)
            correct += (logits.detach().argmax(dim=1) == labels).sum()
            count += len(labels)
            if not last_micro:
                continue
            stop, due = self._optimizer_step()
            if self.nonfinite_streak >= tc.max_nonfinite_steps:
                raise TrainingDiverged(
                    f"{self.nonfinite_streak} consecutive steps with a non-finite loss or gradient (limit "
                    f"train.max_nonfinite_steps={tc.max_nonfinite_steps}); stopping. The last good checkpoint "
                    f"{self.run_dir / checkpoint.LAST} is intact: lower train.lr or enable gradient clipping")
            step_in_epoch = self.global_step - self.epoch * self.steps_per_epoch
            self.logger.step(step_in_epoch, self.global_step, float(loss.detach()), self.scheduler.get_last_lr()[0])
            reached_max = tc.max_steps and self.global_step >= tc.max_steps
            if stop or due or reached_max:
                if step_in_epoch == self.steps_per_epoch:
                    break  # the end-of-epoch checkpoint follows right away
                self.partial_epoch = self._merge(sums, loss_sum, correct, count, time.perf_counter() - t0)
                self.save((checkpoint.LAST,))
                self.last_checkpoint_time = time.monotonic()
                self.log(f"checkpoint: {self.run_dir / checkpoint.LAST} at step {self.global_step}")
                if stop:
                    return "signal", None
                if reached_max:
                    return "max_steps", None
        self.partial_epoch = {}
        return "done", self._merge(sums, loss_sum, correct, count, time.perf_counter() - t0)

    def _merge(self, sums: dict, loss_sum, correct, count: int, seconds: float) -> dict:
        totals = torch.tensor([float(loss_sum), float(correct), float(count)], dtype=torch.float64,
                              device=self.device)
        all_reduce_(totals)
        return {"loss": sums["loss"] + totals[0].item(), "correct": sums["correct"] + int(totals[1]),
                "count": sums["count"] + int(totals[2]), "seconds": sums["seconds"] + seconds}

    def end_epoch(self, sums: dict) -> dict:
        """Average BN buffers and EMA over ranks, evaluate both, log, checkpoint."""
        average_tensors_(float_buffers(self.model))
        if self.ema:
            self.ema.sync()
        num_classes = self.cfg.model.num_classes
        tta = self.cfg.train.tta
        results = {"model": evaluate(self.net, self.val_loader, self.eval_transform, num_classes,
                                     self.autocast, tta)}
        if self.ema:
            results["ema"] = evaluate(self.ema.module, self.val_loader, self.eval_transform, num_classes,
                                      self.autocast, tta)
        record = {
            "epoch": self.epoch + 1,
            "global_step": self.global_step,
            "train_loss": sums["loss"] / max(sums["count"], 1),
            "train_acc": sums["correct"] / max(sums["count"], 1),
            "val_loss": results["model"]["loss"],
            "val_acc": results["model"]["acc"],
            "val_count": results["model"]["count"],
            "lr": self.scheduler.get_last_lr()[0],
            "images_per_s": sums["count"] / max(sums["seconds"], 1e-9),
            "epoch_s": sums["seconds"],
            "peak_memory_mb": peak_memory_mb(self.device),
            "nonfinite_steps": self.nonfinite_total,
        }
        if self.ema:
            record.update(ema_val_loss=results["ema"]["loss"], ema_val_acc=results["ema"]["acc"])
        self.history.append(record)
        self.logger.end_epoch(record)
        self.epoch += 1
        names = [checkpoint.LAST]
        for kind, name in (("model", "best.pt"), ("ema", "best_ema.pt")):
            if kind in results and results[kind]["count"] and results[kind]["acc"] > self.best[kind]:
                self.best[kind] = results[kind]["acc"]
                names.append(name)
        self.save(tuple(names))
        self.last_checkpoint_time = time.monotonic()
        self.last_results = results
        return record

    def fit(self) -> int:
        """Train to train.epochs (or train.max_steps); returns the process exit code."""
        previous = {s: signal.signal(s, self._request_stop) for s in STOP_SIGNALS}
        try:
            while self.epoch < self.cfg.train.epochs:
                outcome, sums = self.train_epoch()
                if outcome == "signal":
                    return self._preempted()
                if outcome == "max_steps":
                    self.log(f"reached train.max_steps={self.cfg.train.max_steps}; state saved")
                    return 0
                self.end_epoch(sums)
                if self._agree()[1]:  # a signal that came during evaluation
                    return self._preempted()
                if self.cfg.train.max_steps and self.global_step >= self.cfg.train.max_steps:
                    return 0
            self._final_report()
            return 0
        except TrainingDiverged as err:
            self.log(f"error: {err}")
            return EXIT_DIVERGED
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
            self.logger.close()

    def _preempted(self) -> int:
        how = "run the same command again" if self.cfg.run.dir else f"add run.dir={self.run_dir} to the command"
        self.log(f"stopped by signal; state saved to {self.run_dir / checkpoint.LAST}; exit code "
                 f"{EXIT_PREEMPTED}. To resume, {how} (a torchrun restart or Slurm requeue finds it by itself)")
        return EXIT_PREEMPTED

    def _final_report(self) -> None:
        results = getattr(self, "last_results", None)
        if results is None:
            return
        per_class = {kind: r["per_class_acc"] for kind, r in results.items()}
        self.logger.log_final(per_class, results["model"]["confusion"], list(CLASS_NAMES))
