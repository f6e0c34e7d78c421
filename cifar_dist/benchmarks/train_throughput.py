"""Images/s and peak memory of the training step, per model and per toggle, through the real Trainer.

Each model starts from its recipe (configs/default.yaml for attention_resnet, configs/fast.yaml
for fast), with the data resident on the device (data.loader=gpu: the input path has its own
benchmark) and, in the `baseline` row, every toggle off: channels_last on, fp32, eager, no EMA,
no mixup/cutmix, no SyncBN. Each other row changes one toggle; `recipe` is the recipe file as is.
A row builds a Trainer through engine/build.py and times whole epochs of its loop (augmentation,
forward, backward, clipping, optimizer, EMA, per-step flag agreement, logging). Every row is
built first and runs one untimed warm-up epoch; then --repeats rounds time one epoch of
--steps steps of each row in turn, and each row reports its median epoch. So all rows are held at
once (each with its copy of the data set on the device: about 150 MB for CIFAR-10).

    cifar-dist bench train_throughput [--models attention_resnet,fast] [--toggles ...] [--steps 20]
        [--repeats 3] [--quick] [--data-root DIR] [--device cpu|cuda] [key=value ...]
"""
from __future__ import annotations

import argparse
import time
import traceback
from dataclasses import dataclass, field
from statistics import median

import pandas as pd
import torch

from cifar_dist.benchmarks.common import (Report, add_common_arguments, bench_config, check_common_arguments, csv_list,
                                          free_device_memory, model_settings, quiet_trainer, recipe_path,
                                          registered_models, run_folder, single_process, synchronize, time_epoch,
                                          write_report)
from cifar_dist.engine.distributed import DistEnv
from cifar_dist.errors import ArgumentParser, UserError
from cifar_dist.peak_flops import mfu

NAME = "train_throughput"
# Every toggle off; each row then turns one on.
BASELINE = ["train.channels_last=true", "train.amp=false", "train.compile=false", "train.ema_decay=0",
            "augment.mixup_prob=0", "augment.cutmix_prob=0", "train.sync_bn=off"]
TOGGLES = ("baseline", "channels_last=off", "amp=bf16", "amp=fp16", "compile=on", "ema=on", "mixup_cutmix=on",
           "sync_bn=on", "recipe")
QUICK = ["train.global_batch_size=32"]  # and each model at its registered tiny size
FALLBACK_EMA_DECAY = 0.999
FALLBACK_MIX_PROB = 0.3


def parse_args(argv=None) -> argparse.Namespace:
    parser = ArgumentParser(prog="cifar-dist bench train_throughput", description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    add("--models", default="attention_resnet,fast", help=f"comma-separated subset of {', '.join(registered_models())}")
    add("--toggles", default=None, help=f"comma-separated subset of {', '.join(TOGGLES)} (default: all; "
                                         "with --quick on the CPU all but compile=on)")
    add("--config", default=None, help="one config for every model (default: each model's recipe)")
    add("--steps", type=int, default=20, help="optimizer steps per epoch")
    add("--repeats", type=int, default=3, help="timed epochs per row; the median is reported")
    add("--budget-s", type=float, default=0.0, help="build no more rows and start no more timed rounds after this "
                                                     "many seconds (at least one round runs); 0: no limit")
    add_common_arguments(parser, "tiny widths, batch 32, 2 steps, 1 repeat (for CI)")
    args = parser.parse_args(argv)
    check_common_arguments(parser, args)
    if min(args.steps, args.repeats) < 1 or args.budget_s < 0:
        parser.error("--steps and --repeats must be at least 1, --budget-s at least 0")
    args.models = csv_list(args.models, registered_models(), "--models")
    if args.toggles is None:
        skip_compile = args.quick and args.device == "cpu"  # a cold compile takes about a minute on 2 cores
        args.toggles = [t for t in TOGGLES if not (skip_compile and t == "compile=on")]
    else:
        args.toggles = csv_list(args.toggles, TOGGLES, "--toggles")
    if args.quick:
        args.steps, args.repeats = 2, 1
        args.overrides = [*QUICK, "train.compile=false" if args.device == "cpu" else "", *args.overrides]
        args.overrides = [o for o in args.overrides if o]
    return args


def toggle_overrides(toggle: str, recipe) -> list[str]:
    """The overrides of one row on top of the recipe (recipe: the loaded recipe config)."""
    t, a = recipe.train, recipe.augment
    mix_on = a.mixup_prob > 0 or a.cutmix_prob > 0
    rows = {
        "baseline": [],
        "channels_last=off": ["train.channels_last=false"],
        "amp=bf16": ["train.amp=true", "train.amp_dtype=bf16"],
        "amp=fp16": ["train.amp=true", "train.amp_dtype=fp16"],
        "compile=on": ["train.compile=true"],
        "ema=on": [f"train.ema_decay={t.ema_decay or FALLBACK_EMA_DECAY}"],
        "mixup_cutmix=on": [f"augment.mixup_prob={a.mixup_prob if mix_on else FALLBACK_MIX_PROB}",
                            f"augment.cutmix_prob={a.cutmix_prob if mix_on else FALLBACK_MIX_PROB}"],
        "sync_bn=on": ["train.sync_bn=on"],
    }
    return [] if toggle == "recipe" else [*BASELINE, *rows[toggle]]


@dataclass
class Row:
    """One model × toggle: its trainer while it is measured, then its figures."""

    model: str
    toggle: str
    trainer: object = None
    cfg: object = None
    resident_bytes: int = 0  # what the row keeps allocated on the device after its warm-up
    seconds: list = field(default_factory=list)
    peak_bytes: int = 0
    note: str = ""


def allocated_bytes(device: torch.device) -> int:
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else 0


def start_row(args, row: Row, env: DistEnv, run_dir: str) -> None:
    """Build the row's Trainer and run its untimed warm-up epoch, or note why the row is not measured."""
    if row.toggle == "sync_bn=on" and env.device.type != "cuda":
        row.note = "not measured: SyncBatchNorm runs on CUDA only"
        return
    config = args.config or recipe_path(row.model)
    user = ["data.loader=gpu", *model_settings(row.model, args.quick), *args.overrides]
    recipe = bench_config(config, args.data_root, user)
    settings = [f"data.train_subset={args.steps * recipe.train.global_batch_size}",
                f"train.epochs={1 + args.repeats}", "train.grad_accum_steps=1", f"run.dir={run_dir}"]
    row.cfg = bench_config(config, args.data_root, [*user, *toggle_overrides(row.toggle, recipe)], settings)
    before = allocated_bytes(env.device)
    row.trainer = quiet_trainer(row.cfg, env)
    time_epoch(row.trainer)  # compile, cuDNN autotuning, optimizer state, allocator growth
    row.resident_bytes = allocated_bytes(env.device) - before
    if row.toggle == "sync_bn=on":
        row.note = "1 rank: SyncBatchNorm layers without communication (scaling.py runs more ranks)"


def time_row(row: Row, env: DistEnv) -> None:
    """One timed epoch; on CUDA also the row's peak: its resident bytes plus the epoch's transient peak."""
    device = env.device
    if device.type == "cuda":
        synchronize(device)
        others = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    row.seconds.append(time_epoch(row.trainer))
    if device.type == "cuda":
        transient = torch.cuda.max_memory_allocated(device) - others
        row.peak_bytes = max(row.peak_bytes, row.resident_bytes + transient)


def figures(row: Row) -> dict:
    """The CSV row of a measured (or skipped, or failed) Row."""
    out = {"model": row.model, "toggle": row.toggle, "images_per_s": float("nan"), "step_ms": float("nan"),
           "tflops": float("nan"), "mfu": float("nan"), "peak_memory_mb": float("nan"), "note": row.note}
    if not row.seconds:
        return out
    plan, cfg, seconds = row.trainer.run.plan, row.cfg, median(row.seconds)
    images_per_s = plan.steps_per_epoch * plan.global_batch_size / seconds
    tflops = plan.train_flops_per_image * images_per_s / 1e12
    out.update(images_per_s=images_per_s, step_ms=1000 * seconds / plan.steps_per_epoch, tflops=tflops,
               mfu=mfu(tflops, plan.peak_tflops) or float("nan"),
               peak_memory_mb=row.peak_bytes / 2**20 if row.peak_bytes else float("nan"),
               batch=plan.global_batch_size, steps=plan.steps_per_epoch, repeats=len(row.seconds),
               channels_last=plan.channels_last, amp=plan.amp_dtype, grad_scaler=plan.grad_scaler,
               compile=plan.compile, ema=plan.ema, mixup_cutmix=f"{cfg.augment.mixup_prob}/{cfg.augment.cutmix_prob}",
               sync_bn=plan.sync_bn)
    return out


def guarded(row: Row, action, *args) -> bool:
    """Run action(*args); a failure marks the row (e.g. no compiler for compile=on) instead of ending the run."""
    try:
        action(*args)
        return True
    except UserError:
        raise
    except Exception as err:
        traceback.print_exc()
        first_line = (str(err).splitlines() or [""])[0][:200]
        row.note, row.trainer, row.seconds = f"failed: {type(err).__name__}: {first_line}", None, []
        return False


def measure(args, env: DistEnv) -> list[Row]:
    """Every row built and warmed up, then timed round-robin: one epoch of each row per round."""
    rows = [Row(model, toggle) for model in args.models for toggle in args.toggles]
    deadline = time.monotonic() + args.budget_s if args.budget_s else float("inf")
    with run_folder() as base_dir:
        for index, row in enumerate(rows):
            if time.monotonic() > deadline:
                row.note = f"not measured: --budget-s {args.budget_s:g} spent"
                continue
            print(f"[build] {row.model}: {row.toggle} (warm-up epoch)", flush=True)
            guarded(row, start_row, args, row, env, f"{base_dir}/{index}")
        for repeat in range(args.repeats):  # drifts of a shared machine hit every row alike
            if repeat and time.monotonic() > deadline:
                print(f"[run] --budget-s {args.budget_s:g} spent: {repeat} timed round(s)", flush=True)
                break
            print(f"[run] round {repeat + 1}/{args.repeats}", flush=True)
            for row in rows:
                if row.trainer is not None:
                    guarded(row, time_row, row, env)
        for row in rows:
            if row.trainer is not None:
                row.trainer.close()
    return rows


def plot(frame: pd.DataFrame, models: list[str]):
    def draw(figure) -> None:
        axes = figure.subplots(1, len(models), squeeze=False)[0]
        for axis, model in zip(axes, models):
            rows = frame[frame.model == model]
            axis.barh(rows.toggle, rows.images_per_s, color="tab:blue")
            axis.invert_yaxis()
            axis.set_title(model)
            axis.set_xlabel("images/s")
            axis.grid(True, axis="x", alpha=0.3)
    return draw


def main(argv=None) -> int:
    args = parse_args(argv)
    env, info = single_process(args)
    for model in args.models:  # a bad override or a missing recipe is the user's to fix, before anything runs
        bench_config(args.config or recipe_path(model), args.data_root, ["data.loader=gpu", f"model.name={model}",
                                                                         *args.overrides])
    rows = measure(args, env)
    failed = sum(row.note.startswith("failed") for row in rows)
    frame = pd.DataFrame([figures(row) for row in rows])
    del rows
    free_device_memory(env.device)
    for model in args.models:  # speed relative to the model's baseline row
        mask = frame.model == model
        base = frame.loc[mask & (frame.toggle == "baseline"), "images_per_s"]
        frame.loc[mask, "vs_baseline"] = frame.loc[mask, "images_per_s"] / base.iloc[0] if len(base) else float("nan")
    first = ["model", "toggle", "images_per_s", "vs_baseline", "step_ms", "tflops", "mfu", "peak_memory_mb"]
    frame = frame[first + [c for c in frame.columns if c not in first]]
    rules = [
        f"each row: one untimed warm-up epoch (compile, cuDNN autotuning, optimizer state), then {args.repeats} "
        f"timed epochs of {args.steps} steps, round-robin over the rows (so drifts of a shared machine hit every "
        "row alike); the median epoch is reported; CUDA synchronised at both ends of each epoch",
        "the step is the real Trainer's loop: gpu loader (data resident on the device), augmentation of the "
        "recipe, forward, loss, backward, clipping, optimizer, schedule, EMA, per-step flag agreement, logging",
        "baseline: channels_last, fp32, eager, no EMA, no mixup/cutmix, no SyncBN; each row changes one toggle; "
        "recipe: the model's config file as it is",
        "peak_memory_mb (CUDA): the row's own tensors at their peak: what it keeps allocated after its warm-up "
        "(model, optimizer state, EMA, the data set on the device) plus the transient peak of its timed epochs, "
        "from torch.cuda's allocator statistics; not measured on the CPU",
        "step_ms: the median epoch divided by its steps",
        "tflops: the training FLOPs of an image (forward and backward, from torch's FLOP counter) × images/s; "
        "mfu: tflops over the device's peak dense throughput for the row's dtype (cifar_dist/peak_flops.py), "
        "empty where the peak is unknown (every CPU)",
    ]
    report = Report(NAME, "Training-step throughput per model and toggle", frame, rules, info,
                    plot=plot(frame, args.models),
                    columns=["model", "toggle", "images_per_s", "vs_baseline", "step_ms", "tflops", "mfu",
                             "peak_memory_mb", "note"])
    write_report(report, args, argv, quick_size="tiny models and 2 steps")
    return 1 if failed else 0
