"""Time to accuracy: a fixed recipe's whole run, timed as the speed records time it.

Each run builds the real Trainer (engine/build.py) on one device and trains the config to its end
with `Trainer.run_epoch` (no early stop on the eval split: the records report a fixed recipe's test
accuracy). The clock follows airbench: it excludes reading the data from disk and includes the
whitening init and the final evaluation with the config's TTA (train.tta). Timed:
  the run assembly (data upload, model build, whitening init), minus the reading of the data from
  disk (timed on its own just before, with the same reader)
  + every training epoch (no evaluation, no checkpoint write: save=False)
  + the final evaluation of the model with TTA.
After each epoch an untimed evaluation without TTA gives the accuracy curve. --warmup-runs (default
1) untimed runs come first, as in airbench: they hold the one-off costs (torch.compile, cuDNN
autotuning, allocator growth). --runs N reports the mean and std of the final accuracy and of the
time, and the fraction of runs whose final accuracy reached --target.

    cifar-dist bench time_to_accuracy [--config configs/fast.yaml] [--target 0.94] [--runs 1]
        [--warmup-runs K] [--quick] [--data-root DIR] [key=value ...]
"""
from __future__ import annotations

import argparse
import dataclasses
import statistics
import time
from pathlib import Path

import pandas as pd

from cifar_dist.benchmarks.common import (Report, add_common_arguments, bench_config, check_common_arguments,
                                          free_device_memory, model_settings, quiet_trainer, recipe_path, run_folder,
                                          single_process, synchronize, write_report)
from cifar_dist.data.splits import load_split
from cifar_dist.engine.distributed import DistEnv
from cifar_dist.config import load_config
from cifar_dist.engine.evaluation import score_split
from cifar_dist.errors import ArgumentParser, ConfigError

NAME = "time_to_accuracy"
QUICK = ["train.global_batch_size=64", "train.epochs=2", "train.compile=false",
         "data.train_subset=256"]


def parse_args(argv=None) -> argparse.Namespace:
    parser = ArgumentParser(prog="cifar-dist bench time_to_accuracy", description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    add("--config", default=None, help="config file (default: configs/fast.yaml)")
    add("--target", type=float, default=0.94, help="accuracy to reach on the eval split (0-1)")
    add("--runs", type=int, default=1, help="timed runs, seeds train.seed, train.seed + 1, ...")
    add("--warmup-runs", type=int, default=1, help="untimed runs first (one-off costs: compile, allocator, caches)")
    add_common_arguments(parser, "tiny fast net, 256 images, 2 epochs, 2 runs, target 0.1 (for CI)")
    args = parser.parse_args(argv)
    check_common_arguments(parser, args)
    if args.runs < 1 or not 0 < args.target <= 1 or args.warmup_runs < 0:
        parser.error("--runs must be at least 1, --target in (0, 1], --warmup-runs at least 0")
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


def one_run(cfg, env: DistEnv, target: float, run_index: int) -> tuple[dict, list[dict]]:
    """(summary of one run, one point per epoch)."""
    device = env.device
    read_s = read_data(cfg)
    tc = cfg.train
    with run_folder() as run_dir:
        cfg = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, dir=run_dir))
        synchronize(device)
        started = time.perf_counter()
        with quiet_trainer(cfg, env) as trainer:
            synchronize(device)
            assembly_s = time.perf_counter() - started
            timed_s = max(assembly_s - read_s, 0.0)
            run, points = trainer.run, []
            while trainer.progress.global_step < run.plan.total_steps:
                synchronize(device)
                started = time.perf_counter()
                outcome = trainer.run_epoch(evaluate=False, save=False)
                synchronize(device)
                timed_s += time.perf_counter() - started
                if outcome is not None:
                    raise ConfigError(f"the run stopped early: {outcome.description}")
                plain = score_split(run.net, run.eval_loader, run.eval_transform, cfg.model.num_classes,
                                    run.autocast)
                points.append({"run": run_index, "epoch": trainer.progress.epoch, "time_s": timed_s,
                               "acc": plain["acc"]})
            synchronize(device)
            started = time.perf_counter()
            final = score_split(run.net, run.eval_loader, run.eval_transform, cfg.model.num_classes, run.autocast,
                                tc.tta, tc.tta_average, tc.tta_fraction)
            synchronize(device)
            timed_s += time.perf_counter() - started
            plan = run.plan
            del run
        free_device_memory(device)
    summary = {"run": run_index, "seed": tc.seed, "acc": final["acc"], "reached": final["acc"] >= target,
               "time_s": timed_s, "epochs": plan.epochs, "steps": plan.total_steps, "read_s": read_s,
               "assembly_s": assembly_s, "train_images": plan.train_images, "eval_split": plan.eval_split,
               "eval_images": plan.eval_images, "tta": tc.tta, "compile": plan.compile, "amp": plan.amp_dtype}
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
    env, info = single_process(args)
    base = bench_config(args.config, args.data_root, args.overrides)
    warmup_runs = args.warmup_runs
    summaries, points = [], []
    for index in range(warmup_runs + args.runs):
        timed = index >= warmup_runs
        seed = base.train.seed + index - warmup_runs if timed else base.train.seed
        cfg = dataclasses.replace(base, train=dataclasses.replace(base.train, seed=seed))
        print(f"[run] {'run ' + str(index - warmup_runs + 1) if timed else 'untimed warm-up run'} "
              f"(seed {seed})", flush=True)
        summary, run_points = one_run(cfg, env, args.target, index - warmup_runs)
        if timed:
            summaries.append(summary)
            points.extend(run_points)
    frame = pd.DataFrame(summaries)
    first = frame.iloc[0]
    spread = (lambda column: statistics.stdev(column) if len(column) > 1 else float("nan"))
    overview = pd.DataFrame([{
        "config": shown_path(args.config), "target": args.target, "eval_split": first.eval_split,
        "train_images": int(first.train_images), "epochs": first.epochs, "runs": len(frame),
        "acc_mean": frame.acc.mean(), "acc_std": spread(list(frame.acc)), "reached_fraction": frame.reached.mean(),
        "time_mean_s": frame.time_s.mean(), "time_std_s": spread(list(frame.time_s)), "read_s": frame.read_s.mean(),
    }])
    rules = [
        "each run trains the config to its end (no early stop on the eval split, as the records report a fixed "
        "recipe); acc: the final evaluation with TTA train.tta; reached: acc at or above the target",
        "timed: run assembly minus reading the data from disk (read_s, the same reader timed just before) "
        "+ every training epoch (no evaluation, no checkpoint write) + the final evaluation; the per-epoch "
        "accuracies of the curve are untimed (as airbench); CUDA synchronised",
        f"{warmup_runs} untimed warm-up run(s) first (compile, autotuning, allocator); runs use seeds {base.train.seed}.."
        f"{base.train.seed + args.runs - 1}",
        f"train_images: the training split the runs used (from {args.data_root})",
    ]
    report = Report(NAME, f"A fixed recipe's run, timed; target {args.target:.2%}", overview, rules, info,
                    plot=plot(pd.DataFrame(points), args.target, first.eval_split, int(first.tta)))
    report.notes.append("per run: " + "; ".join(
        f"run {r.run}: acc {r.acc:.4f} ({'reached' if r.reached else 'not reached'}) in {r.time_s:.2f} s"
        for r in frame.itertuples()))
    report.extra_csv["runs"] = frame
    write_report(report, args, argv, quick_size="a tiny net on a subset")
    return 0
