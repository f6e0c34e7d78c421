"""Time to accuracy: run a config until the eval split reaches a target accuracy, or to its end.

Each run builds the real Trainer (engine/build.py) on one device and trains epoch by epoch with
`Trainer.train_epoch`; after each epoch the model is evaluated on the run's eval split (val, or
test with data.val_fraction=0) with the config's TTA level (train.tta). The clock follows the
speed records (airbench): it excludes reading the data from disk and includes the whitening
init and the TTA evaluation. Here the timed region is
  the run assembly (data upload, model build, whitening init), minus the reading of the data from
  disk (timed on its own just before, with the same reader)
  + the training epochs up to the first one whose evaluation reaches the target
  + that evaluation (with TTA); earlier per-epoch evaluations are not timed, as in airbench.
--warmup-runs (default 1) untimed runs come first, as in airbench: they hold the one-off costs
(torch.compile, cuDNN autotuning, allocator growth). --runs N reports mean, std and the fraction of runs that reached the
target (the time statistics over those that did).

    cifar-dist bench time_to_accuracy [--config configs/fast.yaml] [--target 0.94] [--runs 1]
        [--budget-s S] [--warmup-runs K] [--quick] [--data-root DIR] [key=value ...]
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import statistics
import sys
import time
from pathlib import Path

import pandas as pd
import torch

from cifar_dist.benchmarks.common import (Report, add_common_arguments, bench_config,
                                     check_common_arguments, free_device_memory, hardware,
                                     model_settings, quiet_trainer, recipe_path, run_folder, run_main, synchronize, write_report)
from cifar_dist.data.splits import load_split
from cifar_dist.engine.distributed import DistEnv
from cifar_dist.config import load_config
from cifar_dist.engine.evaluation import score_split
from cifar_dist.errors import ConfigError

NAME = "time_to_accuracy"
QUICK = ["train.global_batch_size=64", "train.epochs=2", "train.compile=false",
         "data.train_subset=256"]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="cifar-dist bench time_to_accuracy", description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    add("--config", default=None, help="config file (default: configs/fast.yaml)")
    add("--target", type=float, default=0.94, help="accuracy to reach on the eval split (0-1)")
    add("--runs", type=int, default=1, help="timed runs, seeds train.seed, train.seed + 1, ...")
    add("--warmup-runs", type=int, default=1, help="untimed runs first (one-off costs: compile, allocator, caches)")
    add("--budget-s", type=float, default=0.0, help="stop a run after this many timed seconds (0: the config's epochs)")
    add_common_arguments(parser, "tiny fast net, 256 images, 2 epochs, 2 runs, target 0.1 (for CI)")
    args = parser.parse_args(argv)
    check_common_arguments(parser, args)
    if args.runs < 1 or not 0 < args.target <= 1 or args.budget_s < 0 or args.warmup_runs < 0:
        parser.error("--runs must be at least 1, --target in (0, 1], --budget-s and --warmup-runs at least 0")
    args.config = args.config or recipe_path("fast")
    if args.quick:
        args.runs, args.target = 2, 0.1
        model = load_config(args.config).model.name
        args.overrides = [*QUICK, *model_settings(model, quick=True), *args.overrides]
    return args


def shown_path(path) -> str:
    """path relative to the working directory when it lies below it (the table's config column)."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def read_data(cfg) -> float:
    """Seconds to read the splits the run reads, with the loaders' reader (also warms the page cache)."""
    started = time.perf_counter()
    load_split(cfg.data, "train")
    load_split(cfg.data, "val" if cfg.data.val_fraction > 0 else "test")
    return time.perf_counter() - started


def one_run(cfg, env: DistEnv, target: float, budget_s: float, run_index: int) -> tuple[dict, list[dict]]:
    """(summary of one run, one point per epoch)."""
    device = env.device
    read_s = read_data(cfg)
    with run_folder() as run_dir:
        cfg = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, dir=run_dir))
        synchronize(device)
        started = time.perf_counter()
        trainer = quiet_trainer(cfg, env)
        synchronize(device)
        assembly_s = time.perf_counter() - started
        timed_s = max(assembly_s - read_s, 0.0)
        run, points, reached_s = trainer.run, [], float("nan")
        try:
            while trainer.progress.global_step < run.plan.total_steps and (not budget_s or timed_s < budget_s):
                synchronize(device)
                started = time.perf_counter()
                outcome = trainer.train_epoch()
                synchronize(device)
                timed_s += time.perf_counter() - started
                if outcome is not None:
                    raise ConfigError(f"the run stopped early: {outcome.description}")
                trainer.close_epoch()
                started = time.perf_counter()
                result = score_split(run.net, run.eval_loader, run.eval_transform, cfg.model.num_classes,
                                     run.autocast, cfg.train.tta, cfg.train.tta_average, cfg.train.tta_fraction)
                synchronize(device)
                eval_s = time.perf_counter() - started
                points.append({"run": run_index, "epoch": trainer.progress.epoch, "time_s": timed_s + eval_s,
                               "acc": result["acc"]})
                if result["acc"] >= target:
                    reached_s = timed_s + eval_s
                    break
            plan = run.plan
        finally:
            trainer.logger.close()
            del trainer, run
            free_device_memory(device)
    last = points[-1] if points else {"epoch": 0, "acc": float("nan"), "time_s": timed_s}
    summary = {"run": run_index, "seed": cfg.train.seed, "reached": not math.isnan(reached_s),
               "time_to_target_s": reached_s, "epochs": last["epoch"], "acc": last["acc"],
               "timed_s": last["time_s"], "read_s": read_s, "assembly_s": assembly_s,
               "train_images": plan.train_images, "eval_split": plan.eval_split, "eval_images": plan.eval_images,
               "tta": cfg.train.tta, "compile": plan.compile, "amp": plan.amp_dtype}
    return summary, points


def plot(points: pd.DataFrame, target: float, split: str, tta: int):
    def draw(figure) -> None:
        axis = figure.subplots()
        for run, rows in points.groupby("run"):
            axis.plot(rows.time_s, rows.acc, marker="o", label=f"run {run}")
        axis.axhline(target, color="tab:red", linestyle="--", label=f"target {target}")
        axis.set(xlabel="timed seconds", ylabel=f"accuracy ({split} split, TTA level {tta})",
                 title="Accuracy against time")
        axis.grid(True, alpha=0.3)
        axis.legend()
    return draw


def main(argv=None) -> int:
    args = parse_args(argv)
    env = DistEnv(device=torch.device(args.device))
    info = hardware(env.device)
    base = bench_config(args.config, args.data_root, args.overrides)
    warmup_runs = args.warmup_runs
    summaries, points = [], []
    for index in range(warmup_runs + args.runs):
        timed = index >= warmup_runs
        seed = base.train.seed + index - warmup_runs if timed else base.train.seed
        cfg = dataclasses.replace(base, train=dataclasses.replace(base.train, seed=seed))
        print(f"[run] {'run ' + str(index - warmup_runs + 1) if timed else 'untimed warm-up run'} "
              f"(seed {seed})", flush=True)
        summary, run_points = one_run(cfg, env, args.target, args.budget_s, index - warmup_runs)
        if timed:
            summaries.append(summary)
            points.extend(run_points)
    frame = pd.DataFrame(summaries)
    reached = frame[frame.reached]
    times = list(reached.time_to_target_s)
    first = frame.iloc[0]
    overview = pd.DataFrame([{
        "config": shown_path(args.config), "target": args.target, "eval_split": first.eval_split,
        "train_images": int(first.train_images), "runs": len(frame), "reached_fraction": len(reached) / len(frame),
        "time_mean_s": statistics.mean(times) if times else float("nan"),
        "time_std_s": statistics.stdev(times) if len(times) > 1 else float("nan"),
        "acc_mean": frame.acc.mean(), "epochs_mean": frame.epochs.mean(), "read_s": frame.read_s.mean(),
    }])
    rules = [
        "timed: run assembly minus reading the data from disk (read_s, the same reader timed just before) "
        "+ training epochs up to the first evaluation at or above the target + that evaluation (with TTA "
        "train.tta); earlier per-epoch evaluations untimed (as airbench); CUDA synchronised",
        f"{warmup_runs} untimed warm-up run(s) first (compile, autotuning, allocator); runs use seeds {base.train.seed}.."
        f"{base.train.seed + args.runs - 1}; time mean/std over the runs that reached the target",
        f"train_images: the training split the runs used (from {args.data_root})",
    ]
    report = Report(NAME, f"Time to {args.target:.2%} accuracy", overview, rules, info,
                    plot=plot(pd.DataFrame(points), args.target, first.eval_split, int(first.tta)))
    report.notes.append("per run: " + "; ".join(
        f"run {r.run}: {'reached in ' + format(r.time_to_target_s, '.2f') + ' s' if r.reached else 'not reached'}"
        f" after {r.epochs} epochs, acc {r.acc:.4f}" for r in frame.itertuples()))
    report.extra_csv["runs"] = frame
    write_report(report, args, argv, quick_size="a tiny net on a subset")
    return 0


def cli(argv=None) -> int:
    return run_main(main, argv)


if __name__ == "__main__":
    sys.exit(cli())
