"""Scaling over ranks: the real Trainer's epoch at 1, 2, ... N ranks under torchrun (gloo on the
CPU, NCCL on GPUs), weak (fixed per-rank batch) and strong (fixed global batch).

For each rank count, one `torchrun --standalone --nproc-per-node N` runs this module as a worker
on every rank; each mode builds a Trainer through engine/build.py (DDP, SyncBN on CUDA with more
than one rank, as training does), runs one untimed warm-up epoch and --repeats timed epochs of
--steps steps; rank 0 records the median. Efficiency is total images/s at N ranks divided by
N × total images/s at 1 rank, in the same mode. On the CPU every rank runs --threads threads
(default 1; splitting the cores between ranks fails on shared cores, where a team of threads waits
for its slowest member), so N ranks want N × threads free cores: on a small machine the figure
measures the overhead of DDP and gloo on the CPU, not the speed-up GPUs give.

    cifar-dist bench scaling [--model fast] [--ranks 1,2] [--modes weak,strong] [--per-rank-batch B]
        [--global-batch G] [--steps 10] [--repeats 3] [--quick] [--data-root DIR] [key=value ...]
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pandas as pd
import torch

import cifar_dist
from cifar_dist.benchmarks.common import (Report, add_common_arguments, bench_config, check_common_arguments, csv_list,
                                          hardware, measure_epochs, model_settings, recipe_path, run_main, write_report)
from cifar_dist.errors import ArgumentParser, ConfigError

NAME = "scaling"
MODES = ("weak", "strong")
QUICK = ["train.compile=false"]  # and the model at its registered tiny size
QUICK_BATCH = 32


def parse_args(argv=None) -> argparse.Namespace:
    parser = ArgumentParser(prog="cifar-dist bench scaling", description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    add("--model", default="fast", help="registered model whose recipe is run (`cifar-dist model-summary` lists them)")
    add("--config", default=None, help="config file (default: the model's recipe)")
    add("--ranks", default=None, help="comma-separated rank counts (default: 1, 2, 4, ... up to the GPUs; "
                                      "1,2 on the CPU)")
    add("--modes", default="weak,strong", help="weak: fixed per-rank batch; strong: fixed global batch")
    add("--per-rank-batch", type=int, default=0, help="weak scaling's batch per rank (default: the recipe's "
                                                      "global batch)")
    add("--global-batch", type=int, default=0, help="strong scaling's global batch (default: the recipe's)")
    add("--steps", type=int, default=10, help="optimizer steps per timed epoch")
    add("--repeats", type=int, default=3, help="timed epochs per point; the median is reported")
    add("--worker", default=None, help=argparse.SUPPRESS)  # set by the driver for the ranks it launches
    add_common_arguments(parser, f"tiny widths, batch {QUICK_BATCH}, 2 steps, 1 repeat (for CI)")
    args = parser.parse_args(argv)
    check_common_arguments(parser, args)
    if min(args.steps, args.repeats) < 1 or min(args.per_rank_batch, args.global_batch) < 0:
        parser.error("--steps and --repeats must be at least 1, the batch sizes at least 0 (0: the recipe's)")
    args.modes = csv_list(args.modes, MODES, "--modes")
    if args.quick:
        args.steps, args.repeats = 2, 1
        args.per_rank_batch = args.per_rank_batch or QUICK_BATCH
        args.global_batch = args.global_batch or QUICK_BATCH
        args.overrides = [*QUICK, *model_settings(args.model, quick=True), *args.overrides]  # workers get them too
    return args


def default_ranks(device: str) -> list[int]:
    top = torch.cuda.device_count() if device == "cuda" else 2
    ranks, n = [], 1
    while n <= top:
        ranks.append(n)
        n *= 2
    return ranks if ranks[-1] == top else [*ranks, top]


def rank_counts(args) -> list[int]:
    if args.ranks is None:
        return default_ranks(args.device)
    try:
        ranks = sorted({int(r) for r in args.ranks.split(",") if r.strip()})
    except ValueError:
        raise ConfigError(f"--ranks takes comma-separated positive integers; got {args.ranks!r}") from None
    if not ranks or ranks[0] < 1:
        raise ConfigError(f"--ranks takes comma-separated positive integers; got {args.ranks!r}")
    if args.device == "cuda" and ranks[-1] > torch.cuda.device_count():
        raise ConfigError(f"--ranks asks for {ranks[-1]} ranks but torch sees {torch.cuda.device_count()} GPUs")
    return ranks


def mode_batch(args, mode: str, world_size: int, recipe_batch: int) -> int:
    """The global batch of one point."""
    if mode == "weak":
        return (args.per_rank_batch or recipe_batch) * world_size
    return args.global_batch or recipe_batch


# --- the worker: one process per rank ----------------------------------------------------------

def worker(args) -> int:
    from cifar_dist.engine.distributed import init_distributed, shutdown

    out = Path(args.worker)
    config = args.config or recipe_path(args.model)
    user = ["data.loader=gpu", *model_settings(args.model, quick=False), *args.overrides]
    recipe = bench_config(config, args.data_root, user)
    env = init_distributed(args.device)
    try:
        for mode in args.modes:
            batch = mode_batch(args, mode, env.world_size, recipe.train.global_batch_size)
            settings = [f"train.global_batch_size={batch}", f"data.train_subset={args.steps * batch}",
                        f"train.epochs={1 + args.repeats}", "train.grad_accum_steps=1"]
            cfg = bench_config(config, args.data_root, user, settings)
            timed = measure_epochs(cfg, env, args.repeats, out / mode)
            if env.is_main:
                plan = timed.plan
                record = {"mode": mode, "ranks": env.world_size, "global_batch": plan.global_batch_size,
                          "per_rank_batch": plan.micro_batch_size, "steps": plan.steps_per_epoch,
                          "seconds": timed.seconds, "images_per_s": timed.images_per_s,
                          "sync_bn": plan.sync_bn, "amp": plan.amp_dtype, "compile": plan.compile}
                (out / f"{mode}.json").write_text(json.dumps(record))
    finally:
        gc.collect()  # drop the DDP module before the process group (see cifar_dist/train.py)
        shutdown()
    return 0


# --- the driver --------------------------------------------------------------------------------

def launch(args, ranks: int, folder: Path) -> tuple[int, str]:
    """Run the worker on `ranks` ranks under torchrun; (exit code, last lines of its output)."""
    threads = max(1, args.threads)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks),
               "-m", "cifar_dist.benchmarks.scaling", "--worker", str(folder), "--model", args.model,
               *(["--config", str(args.config)] if args.config else []), "--modes", ",".join(args.modes),
               "--per-rank-batch", str(args.per_rank_batch), "--global-batch", str(args.global_batch),
               "--steps", str(args.steps), "--repeats", str(args.repeats), "--device", args.device,
               "--threads", str(threads), *(["--data-root", str(args.data_root)] if args.data_root else []),
               *args.overrides]
    package_parent = str(Path(cifar_dist.__file__).resolve().parents[1])
    env = {**os.environ, "OMP_NUM_THREADS": str(threads),
           "PYTHONPATH": os.pathsep.join(filter(None, [package_parent, os.environ.get("PYTHONPATH")]))}
    result = subprocess.run(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return result.returncode, "\n".join(result.stdout.splitlines()[-30:])


def plot(frame: pd.DataFrame):
    def draw(figure) -> None:
        speed, efficiency = figure.subplots(1, 2)
        for mode, rows in frame.groupby("mode", sort=False):
            speed.plot(rows.ranks, rows.total_images_per_s, marker="o", label=mode)
            efficiency.plot(rows.ranks, rows.efficiency, marker="o", label=mode)
            base = rows[rows.ranks == 1].total_images_per_s
            if len(base):
                speed.plot(rows.ranks, base.iloc[0] * rows.ranks, linestyle=":", color="gray")
        speed.set(xlabel="ranks", ylabel="total images/s", title="Throughput (dotted: linear)")
        efficiency.set(xlabel="ranks", ylabel="efficiency", title="Scaling efficiency", ylim=(0, 1.2))
        for axis in (speed, efficiency):
            axis.set_xticks(sorted(frame.ranks.unique()))
            axis.grid(True, alpha=0.3)
            axis.legend()
    return draw


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        return worker(args)
    device = torch.device(args.device)
    info = hardware(device)
    ranks = rank_counts(args)
    recipe = bench_config(args.config or recipe_path(args.model), args.data_root,
                          ["data.loader=gpu", *model_settings(args.model, quick=False), *args.overrides])
    for mode in args.modes:
        for n in ranks:
            batch = mode_batch(args, mode, n, recipe.train.global_batch_size)
            if batch % n:
                raise ConfigError(f"{mode} scaling at {n} ranks: the global batch {batch} does not divide; pick a "
                                 f"--global-batch that is a multiple of {n}")
    rows, failed = [], 0
    with tempfile.TemporaryDirectory(prefix="cifar_dist_scaling_") as tmp:
        for n in ranks:
            folder = Path(tmp) / f"ranks{n}"
            folder.mkdir()
            print(f"[run] {n} rank(s): {', '.join(args.modes)}", flush=True)
            code, tail = launch(args, n, folder)
            if code != 0:
                print(tail, file=sys.stderr)
                failed += 1
            for mode in args.modes:
                path = folder / f"{mode}.json"
                if path.is_file():
                    rows.append(json.loads(path.read_text()))
                else:
                    rows.append({"mode": mode, "ranks": n, "note": f"failed: torchrun exit code {code}"})
    frame = pd.DataFrame(rows)
    frame["total_images_per_s"] = frame.pop("images_per_s") if "images_per_s" in frame else float("nan")
    frame["per_rank_images_per_s"] = frame.total_images_per_s / frame.ranks
    for mode in args.modes:
        mask = frame["mode"] == mode
        base = frame.loc[mask & (frame.ranks == 1), "total_images_per_s"]
        frame.loc[mask, "efficiency"] = (frame.loc[mask, "total_images_per_s"] / (frame.loc[mask, "ranks"] * base.iloc[0])
                                         if len(base) else float("nan"))
    if "seconds" in frame:
        frame["seconds"] = frame["seconds"].map(lambda s: " ".join(f"{x:.4f}" for x in s) if isinstance(s, list) else "")
    backend = "NCCL" if device.type == "cuda" else "gloo"
    rules = [
        f"torchrun --standalone, {backend}; the real Trainer (DDP; SyncBN on CUDA with more than one rank); one "
        f"untimed warm-up epoch, then the median of {args.repeats} epochs of {args.steps} steps; CUDA synchronised",
        "weak: fixed per-rank batch (global batch grows with the ranks); strong: fixed global batch",
        "efficiency = total images/s at N ranks / (N x total images/s at 1 rank), per mode",
    ]
    if device.type == "cpu":
        rules.append(f"CPU: {max(1, args.threads)} thread(s) per rank on {info['cpu_cores']} cores: this measures the "
                     "overhead of DDP and gloo on the CPU (and the machine's load), not a speed-up")
    columns = [c for c in ("mode", "ranks", "per_rank_batch", "global_batch", "total_images_per_s",
                           "per_rank_images_per_s", "efficiency", "sync_bn", "note") if c in frame]
    report = Report(NAME, f"Scaling of the training step over ranks ({args.model})", frame, rules, info,
                    plot=plot(frame), columns=columns)
    write_report(report, args, argv, quick_size="tiny model and 2 steps")
    if device.type == "cpu":
        print(f"note: on the CPU ({info['cpu_cores']} cores) this measures the overhead of DDP and gloo, not a "
              "speed-up")
    return 1 if failed else 0


if __name__ == "__main__":  # the workers that torchrun starts (see launch)
    sys.exit(run_main(main, None))
