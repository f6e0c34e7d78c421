"""Framework overhead: the real Trainer's epoch against a bare hand-written loop, interleaved.

Both sides are assembled by engine/build.py from one config (the model's recipe, or --config):
the same model, the same data resident on the device (data.loader=gpu unless overridden), the
same augmentation, optimizer and schedule. The Trainer side runs `Trainer.train_epoch` as
training does: per-step seeded generators, EMA, the per-step all-reduce and host read of the
stop/checkpoint/non-finite flags, the gradient-norm check, the loss and accuracy meters, the
progress logging and the periodic-checkpoint timer. The bare side is the loop below and nothing
else (the recipe's gradient clipping and lr schedule included, as they are part of the recipe).
Each repeat times one epoch of each, in alternating order (ABBA), after one untimed epoch of
each; the ratio Trainer / bare is reported as its median and spread over the repeats.

    cifar-dist bench overhead [--models fast,attention_resnet] [--steps 20] [--repeats 5] [--quick]
        [--data-root DIR] [--device cpu|cuda] [key=value ...]
"""
from __future__ import annotations

import argparse
import time
from statistics import median

import pandas as pd
import torch

from cifar_dist.augment.pipeline import make_generator
from cifar_dist.benchmarks.common import (Report, add_common_arguments, bench_config, check_common_arguments, csv_list,
                                          free_device_memory, model_settings, quiet_trainer, recipe_path,
                                          registered_models, run_folder, single_process, synchronize, time_epoch,
                                          write_report)
from cifar_dist.engine.build import Run, build_run
from cifar_dist.engine.loss import soft_target_cross_entropy
from cifar_dist.engine.distributed import DistEnv
from cifar_dist.errors import ArgumentParser

NAME = "overhead"
TARGET_RATIO = 1.05
QUICK = ["train.global_batch_size=32", "train.compile=false"]  # and each model at its registered tiny size


def parse_args(argv=None) -> argparse.Namespace:
    parser = ArgumentParser(prog="cifar-dist bench overhead", description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    add("--models", default="fast,attention_resnet", help=f"comma-separated subset of {', '.join(registered_models())}")
    add("--config", default=None, help="one config for every model (default: each model's recipe)")
    add("--steps", type=int, default=20, help="optimizer steps per timed epoch")
    add("--repeats", type=int, default=5, help="timed epochs of each side; the ratio's median and spread are reported")
    add_common_arguments(parser, "tiny widths, batch 32, eager, 3 steps, 3 repeats (for CI)")
    args = parser.parse_args(argv)
    check_common_arguments(parser, args)
    if min(args.steps, args.repeats) < 1:
        parser.error("--steps and --repeats must be at least 1")
    args.models = csv_list(args.models, registered_models(), "--models")
    if args.quick:
        args.steps, args.repeats = 3, 3
        args.overrides = [*QUICK, *args.overrides]
    return args


def bare_epoch(run: Run, epoch: int, label_smoothing: float, clip_norm: float) -> float:
    """Seconds of one epoch of the plainest loop over the same parts (no EMA, no checks, no logging)."""
    device = run.plan.device
    run.train_loader.set_epoch(epoch)
    run.net.train()
    generator = make_generator(0, 0, epoch, 0, device)
    synchronize(torch.device(device))
    started = time.perf_counter()
    for images, labels in run.train_loader:
        inputs, targets = run.augment(images, labels, generator, epoch=epoch)
        with run.autocast():
            logits = run.net(inputs)
        loss = soft_target_cross_entropy(logits, targets, label_smoothing, reduction="none").sum() * run.loss_scale
        run.scaler.scale(loss).backward()
        if clip_norm:
            run.scaler.unscale_(run.optimizer)
            torch.nn.utils.clip_grad_norm_(run.model.parameters(), clip_norm)
        run.scaler.step(run.optimizer)
        run.scaler.update()
        run.optimizer.zero_grad(set_to_none=True)
        run.scheduler.step()
    synchronize(torch.device(device))
    return time.perf_counter() - started


def measure_model(args, model: str, env: DistEnv) -> dict:
    config = args.config or recipe_path(model)
    user = ["data.loader=gpu", *model_settings(model, args.quick), *args.overrides]
    recipe = bench_config(config, args.data_root, user)
    epochs = 1 + args.repeats
    settings = [f"data.train_subset={args.steps * recipe.train.global_batch_size}", f"train.epochs={epochs}",
                "train.grad_accum_steps=1"]
    with run_folder() as run_dir:
        cfg = bench_config(config, args.data_root, user, [*settings, f"run.dir={run_dir}"])
        trainer = quiet_trainer(cfg, env)
        bare = build_run(cfg, env)
        tc = cfg.train
        try:
            time_epoch(trainer)  # untimed warm-up of both sides
            bare_epoch(bare, 0, tc.label_smoothing, tc.grad_clip_norm)
            trainer_s, bare_s = [], []
            for repeat in range(args.repeats):
                order = ("trainer", "bare") if repeat % 2 == 0 else ("bare", "trainer")
                for side in order:
                    if side == "trainer":
                        trainer_s.append(time_epoch(trainer))
                    else:
                        bare_s.append(bare_epoch(bare, repeat + 1, tc.label_smoothing, tc.grad_clip_norm))
            plan = trainer.run.plan
        finally:
            trainer.close()
            del trainer, bare
            free_device_memory(env.device)
    ratios = [t / b for t, b in zip(trainer_s, bare_s)]
    images = plan.steps_per_epoch * plan.global_batch_size
    return {"model": model, "ratio_median": median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios),
            "trainer_images_per_s": images / median(trainer_s), "bare_images_per_s": images / median(bare_s),
            "batch": plan.global_batch_size, "steps": plan.steps_per_epoch, "repeats": args.repeats,
            "amp": plan.amp_dtype, "compile": plan.compile, "ema": plan.ema, "widths": model_size(cfg),
            "ratios": " ".join(f"{r:.3f}" for r in ratios)}


def model_size(cfg) -> str:
    """The model's size keys (those its registered tiny preset sets) and their values."""
    from cifar_dist.models import MODELS

    return " ".join(f"{key} {cfg.model.options[key]}" for key in MODELS[cfg.model.name].tiny) or "no size keys"


def plot(frame: pd.DataFrame):
    def draw(figure) -> None:
        axis = figure.subplots()
        for index, row in enumerate(frame.itertuples()):
            ratios = [float(r) for r in row.ratios.split()]
            axis.scatter([index] * len(ratios), ratios, color="tab:blue", alpha=0.6)
            axis.hlines(row.ratio_median, index - 0.25, index + 0.25, color="tab:blue")
        axis.axhline(TARGET_RATIO, color="tab:red", linestyle="--", label=f"target {TARGET_RATIO}")
        axis.axhline(1.0, color="gray", linewidth=0.8)
        axis.set_xticks(range(len(frame)), frame.model)
        axis.set_ylabel("Trainer epoch / bare-loop epoch")
        axis.set_title("Framework overhead (each dot a repeat, bar the median)")
        axis.legend()
    return draw


def main(argv=None) -> int:
    args = parse_args(argv)
    env, info = single_process(args)
    rows = []
    for model in args.models:
        print(f"[run] {model}: Trainer and bare loop, interleaved", flush=True)
        rows.append(measure_model(args, model, env))
    frame = pd.DataFrame(rows)
    rules = [
        f"one untimed epoch of each side, then {args.repeats} timed epochs of each of {args.steps} steps, "
        "interleaved (ABBA); CUDA synchronised at both ends of each epoch",
        "ratio = Trainer epoch seconds / bare-loop epoch seconds of the same repeat; median and min-max over "
        f"repeats; target <= {TARGET_RATIO}",
        "Trainer: the real `Trainer.train_epoch` (per-step generators, EMA, flag all-reduce and host read, "
        "gradient-norm check, meters, logging, checkpoint timer); bare: augment, forward, loss, backward, "
        "the recipe's clipping, optimizer step, schedule; both built by engine/build.py from one config",
    ]
    report = Report(NAME, "Framework overhead: Trainer vs bare loop", frame, rules, info, plot=plot(frame),
                    columns=["model", "widths", "batch", "amp", "compile", "ratio_median", "ratio_min", "ratio_max",
                             "trainer_images_per_s", "bare_images_per_s"])
    write_report(report, args, argv, quick_size="tiny models and 3 steps")
    return 0
