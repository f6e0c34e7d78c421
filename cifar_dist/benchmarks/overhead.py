"""Framework overhead: the real Trainer's epoch against a bare hand-written loop, interleaved.

Both sides are assembled by engine/build.py from one config (the model's recipe, or --config):
the same model, the same data resident on the device (data.loader=gpu unless overridden), the
same augmentation, optimizer, schedule and EMA. Both do the recipe's work and nothing less: the
bare side is the loop below (augment, forward, loss, backward, the recipe's gradient clipping,
optimizer step, schedule, and the EMA update when the recipe has an EMA). The Trainer side runs
`Trainer.run_epoch` as training does, so the ratio is what the framework adds: per-step seeded
generators, the flags agreed per step with a non-finite step put back on the device (a copy and a
select of what the step writes), the loss and accuracy meters, the progress logging.

Two ratios, each timed on epochs in alternating order (ABBA) after one untimed epoch of each side:
- steps: the training steps alone (`run_epoch(evaluate=False, save=False)`: no checkpoint written,
  and the benchmarks switch the checkpoint timer off);
- epoch: the whole epoch as training runs it (`run_epoch(evaluate=True, save=True)`: evaluation
  of the model and its EMA, the metric files, last.pt and best*.pt) against the bare loop plus the
  same evaluation and one `torch.save` of the same state.
Each is reported as its median and spread over the repeats.

    cifar-dist bench overhead [--models fast,attention_resnet] [--steps 20] [--repeats 5] [--quick]
        [--data-root DIR] [--device cpu|cuda] [key=value ...]
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path
from statistics import median

import pandas as pd
import torch

from cifar_dist.augment.pipeline import make_generator
from cifar_dist.benchmarks.common import (Report, add_common_arguments, bench_config, check_common_arguments, csv_list,
                                          free_device_memory, model_settings, quiet_trainer, recipe_path,
                                          registered_models, run_folder, single_process, synchronize, time_epoch,
                                          write_report)
from cifar_dist.config import Config
from cifar_dist.engine.build import Run, build_run
from cifar_dist.engine.evaluation import score_split
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


class BareLoop:
    """The plainest loop over the same parts that does the recipe's work: no checks, no per-step seeding, no logging."""

    def __init__(self, run: Run, cfg: Config, save_path: Path):
        self.run, self.cfg, self.save_path = run, cfg, save_path
        self.epoch_index = self.global_step = 0

    def epoch(self, whole: bool = False) -> float:
        """Seconds of one epoch of steps; whole: with the Trainer's evaluation and one torch.save of the same state."""
        run, tc = self.run, self.cfg.train
        device = torch.device(run.plan.device)
        run.train_loader.set_epoch(self.epoch_index)
        run.net.train()
        generator = make_generator(0, 0, self.epoch_index, 0, device)
        synchronize(device)
        started = time.perf_counter()
        for images, labels in run.train_loader:
            inputs, targets = run.augment(images, labels, generator, epoch=self.epoch_index)
            with run.autocast():
                logits = run.net(inputs)
            loss = soft_target_cross_entropy(logits, targets, tc.label_smoothing, reduction="none").sum()
            run.scaler.scale(loss * run.loss_scale).backward()
            if tc.grad_clip_norm:
                run.scaler.unscale_(run.optimizer)
                torch.nn.utils.clip_grad_norm_(run.model.parameters(), tc.grad_clip_norm)
            run.scaler.step(run.optimizer)
            run.scaler.update()
            run.optimizer.zero_grad(set_to_none=True)
            run.scheduler.step()
            self.global_step += 1
            run.ema.update(run.model, self.global_step)
            if self.global_step == run.plan.total_steps:
                run.ema.finish(run.model)
        if whole:
            nets = [run.net, *([run.ema.module] if run.ema.enabled else [])]
            for net in nets:
                score_split(net, run.eval_loader, run.eval_transform, self.cfg.model.num_classes, run.autocast, 0,
                            tc.tta_average, 1.0)
            torch.save({"model": run.model.state_dict(), "ema": run.ema.state_dict(),
                        "optimizer": run.optimizer.state_dict(), "scheduler": run.scheduler.state_dict(),
                        "scaler": run.scaler.state_dict()}, self.save_path)
        synchronize(device)
        self.epoch_index += 1
        return time.perf_counter() - started


def measure_model(args, model: str, env: DistEnv) -> dict:
    config = args.config or recipe_path(model)
    user = ["data.loader=gpu", *model_settings(model, args.quick), *args.overrides]
    recipe = bench_config(config, args.data_root, user)
    epochs = 1 + 2 * args.repeats
    settings = [f"data.train_subset={args.steps * recipe.train.global_batch_size}", f"train.epochs={epochs}",
                "train.grad_accum_steps=1"]
    with run_folder() as run_dir:
        cfg = bench_config(config, args.data_root, user, [*settings, f"run.dir={run_dir}"])
        trainer = quiet_trainer(cfg, env)
        bare = BareLoop(build_run(cfg, env), cfg, Path(run_dir) / "bare.pt")
        seconds = {(side, whole): [] for side in ("trainer", "bare") for whole in (False, True)}
        try:
            time_epoch(trainer)  # untimed warm-up of both sides
            bare.epoch()
            for repeat in range(args.repeats):
                order = ("trainer", "bare") if repeat % 2 == 0 else ("bare", "trainer")
                for whole in (False, True):
                    for side in order:
                        timed = (time_epoch(trainer, evaluate=whole, save=whole) if side == "trainer"
                                 else bare.epoch(whole))
                        seconds[side, whole].append(timed)
            plan = trainer.run.plan
        finally:
            trainer.close()
            del trainer, bare
            free_device_memory(env.device)
    steps = [t / b for t, b in zip(seconds["trainer", False], seconds["bare", False])]
    whole = [t / b for t, b in zip(seconds["trainer", True], seconds["bare", True])]
    images = plan.steps_per_epoch * plan.global_batch_size
    return {"model": model, "ratio_median": median(steps), "ratio_min": min(steps), "ratio_max": max(steps),
            "epoch_ratio_median": median(whole), "epoch_ratio_min": min(whole), "epoch_ratio_max": max(whole),
            "trainer_images_per_s": images / median(seconds["trainer", False]),
            "bare_images_per_s": images / median(seconds["bare", False]),
            "batch": plan.global_batch_size, "steps": plan.steps_per_epoch, "repeats": args.repeats,
            "amp": plan.amp_dtype, "compile": plan.compile, "ema": plan.ema, "widths": model_size(cfg),
            "ratios": " ".join(f"{r:.3f}" for r in steps), "epoch_ratios": " ".join(f"{r:.3f}" for r in whole)}


def model_size(cfg) -> str:
    """The model's size keys (those its registered tiny preset sets) and their values."""
    from cifar_dist.models import MODELS

    return " ".join(f"{key} {cfg.model.options[key]}" for key in MODELS[cfg.model.name].tiny) or "no size keys"


def plot(frame: pd.DataFrame):
    def draw(figure) -> None:
        axis = figure.subplots()
        for index, row in enumerate(frame.itertuples()):
            for shift, column, median_value, color, label in (
                    (-0.15, row.ratios, row.ratio_median, "tab:blue", "training steps"),
                    (0.15, row.epoch_ratios, row.epoch_ratio_median, "tab:orange", "whole epoch")):
                ratios = [float(r) for r in column.split()]
                axis.scatter([index + shift] * len(ratios), ratios, color=color, alpha=0.6,
                             label=label if index == 0 else None)
                axis.hlines(median_value, index + shift - 0.12, index + shift + 0.12, color=color)
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
        f"one untimed epoch of each side, then per repeat ({args.repeats}) one epoch of {args.steps} steps of each "
        "side and one whole epoch of each, interleaved (ABBA); CUDA synchronised at both ends of each epoch",
        "ratio = Trainer seconds / bare-loop seconds of the same repeat, for the training steps (ratio_*) and for "
        f"the whole epoch (epoch_ratio_*); median and min-max over repeats; target for the steps <= {TARGET_RATIO}",
        "both sides do the recipe's work (augment, forward, loss, backward, the recipe's clipping, optimizer step, "
        "schedule, EMA when the recipe has one), built by engine/build.py from one config; the Trainer adds "
        "per-step generators, the per-step flags (agreed on the device, read a step late, a non-finite "
        "step put back on the device: a copy and a select of what the step writes), meters and logging",
        "whole epoch: Trainer.run_epoch(evaluate=True, save=True) (evaluation of model and EMA, metric files, "
        "last.pt and best*.pt written with fsync) against the bare loop + the same evaluation + one torch.save "
        "of the same state; the checkpoint timer is off",
    ]
    report = Report(NAME, "Framework overhead: Trainer vs bare loop", frame, rules, info, plot=plot(frame),
                    columns=["model", "widths", "batch", "amp", "compile", "ema", "ratio_median", "ratio_min",
                             "ratio_max", "epoch_ratio_median", "trainer_images_per_s", "bare_images_per_s"])
    write_report(report, args, argv, quick_size="tiny models and 3 steps")
    return 0
