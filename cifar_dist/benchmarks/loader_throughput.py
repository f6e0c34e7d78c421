"""Images/s of the whole training input path: loaders × augmentation sets × worker counts, on the same
cores and data.

Each path starts from the stored data and ends in normalised float batches with soft targets, as
the trainer gets them from engine/build.py's `build_train_input`:
- torchvision: DataLoader with the per-image PIL part of the recipe in `workers` worker processes,
  then the part left for the device (normalise, mixup/cutmix);
- ffcv: FFCV Loader over the betons (written first if missing) with `workers` threads, the whole
  recipe on the device;
- gpu: the split resident on the device as uint8, the whole recipe on the device (no workers).
Augmentation sets: none; crop+flip (4 px reflect crop, random flip); reference (the AugmentConfig
defaults: crop, flip, rotation, colour jitter, perspective); reference+mix (and mixup/cutmix 0.3/0.3).

Each cell runs `--warmup-batches` untimed batches first: they hold the one-off costs, FFCV's numba
compilation (~10 s in a fresh process) and the DataLoader's worker start-up. The workers keep
loading while the warm-up runs, so the batches a loader may hold ready by then (its prefetch depth:
a DataLoader's workers × prefetch_factor, FFCV's batches in flight) are taken untimed too: made
before the window, they would count as loaded in no time. Then at least `--images` images are
timed (CUDA synchronised at both ends). With `--repeats R` every cell is timed R times,
round-robin, and the median window is reported.

    cifar-dist bench loader_throughput [--data-root DIR] [--beton-dir DIR] [--batch-size 512]
        [--images N] [--loaders torchvision,ffcv,gpu] [--augment none,crop+flip,reference,reference+mix]
        [--workers 1,2] [--repeats R] [--quick] [--device cpu|cuda] [key=value ...]
"""
from __future__ import annotations

import argparse
import dataclasses
import time

import pandas as pd
import torch

from cifar_dist.augment.pipeline import make_generator
from cifar_dist.benchmarks.common import (Report, add_common_arguments, bench_config, check_common_arguments, csv_list,
                                          hardware, synchronize, write_report)
from cifar_dist.config import AugmentConfig, Config
from cifar_dist.data.beton import prepare
from cifar_dist.engine.build import build_train_input
from cifar_dist.engine.distributed import DistEnv
from cifar_dist.errors import ArgumentParser

NAME = "loader_throughput"
LOADERS = ("torchvision", "ffcv", "gpu")
BASELINE = "torchvision"
WORKERLESS = ("gpu",)
_OFF = {"crop_padding": 0, "flip": "none", "rotate_degrees": 0.0, "perspective_prob": 0.0, "brightness": 0.0,
        "contrast": 0.0, "saturation": 0.0, "hue": 0.0, "cutout_size": 0, "mixup_prob": 0.0, "cutmix_prob": 0.0}
AUGMENT_SETS = {
    "none": _OFF,
    "crop+flip": {**_OFF, "crop_padding": 4, "flip": "random"},
    "reference": {"mixup_prob": 0.0, "cutmix_prob": 0.0},
    "reference+mix": {"mixup_prob": 0.3, "cutmix_prob": 0.3},
}
QUICK = {"images": 256, "batch_size": 128, "warmup_batches": 1, "repeats": 1}


def parse_args(argv=None) -> argparse.Namespace:
    parser = ArgumentParser(prog="cifar-dist bench loader_throughput", description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    add("--beton-dir", default="", help="where the betons are, or are written (default: <data-root>/beton)")
    add("--batch-size", type=int, default=512)
    add("--images", type=int, default=20_000, help="images timed per cell (at least)")
    add("--loaders", default=",".join(LOADERS), help=f"comma-separated subset of {', '.join(LOADERS)}")
    add("--augment", default=",".join(AUGMENT_SETS), help=f"comma-separated subset of {', '.join(AUGMENT_SETS)}")
    add("--workers", default="1,2", help="worker counts of the torchvision and ffcv loaders")
    add("--warmup-batches", type=int, default=2)
    add("--repeats", type=int, default=1, help="timed windows per cell; the median one is reported")
    add("--seed", type=int, default=0)
    add_common_arguments(parser, f"{QUICK['images']} images per cell, batch {QUICK['batch_size']} (for CI)")
    args = parser.parse_args(argv)
    check_common_arguments(parser, args)
    args.loaders = csv_list(args.loaders, LOADERS, "--loaders")
    args.augment = csv_list(args.augment, tuple(AUGMENT_SETS), "--augment")
    try:
        args.workers = sorted({int(w) for w in csv_list(args.workers, None, "--workers")})
    except ValueError:
        parser.error(f"--workers takes comma-separated counts; got {args.workers!r}")
    if min(args.batch_size, args.images, args.repeats, *args.workers) < 1 or args.warmup_batches < 0:
        parser.error("--batch-size, --images, --repeats and --workers must be at least 1, --warmup-batches at least 0")
    if args.quick:
        for key, value in QUICK.items():
            setattr(args, key, value)
    return args


def cell_config(base: Config, loader: str, augment: str, workers: int, seed: int) -> Config:
    return dataclasses.replace(
        base, data=dataclasses.replace(base.data, loader=loader, num_workers=workers),
        augment=dataclasses.replace(AugmentConfig(), **AUGMENT_SETS[augment]),
        train=dataclasses.replace(base.train, seed=seed))


def batches(loader, start_epoch: int):
    """(epoch, step, images, labels) over successive epochs, without end."""
    epoch = start_epoch
    while True:
        loader.set_epoch(epoch)
        for step, (images, labels) in enumerate(loader):
            yield epoch, step, images, labels
        epoch += 1


def prefetch_depth(loader) -> int:
    """Batches a loader may have made before they are asked for: a DataLoader's workers × prefetch_factor, the
    batches FFCV keeps in flight (batches_ahead, and the two it is handing over); none for the gpu loader, which
    gathers each batch when asked."""
    inner = getattr(loader, "loader", None)
    if isinstance(inner, torch.utils.data.DataLoader):
        return inner.num_workers * (inner.prefetch_factor or 0)
    if hasattr(inner, "batches_ahead"):
        return inner.batches_ahead + 2
    return 0


def time_window(loader, augment, device: torch.device, images_wanted: int, warmup_batches: int,
                seed: int, start_epoch: int) -> tuple[int, float]:
    """(images, seconds) for the first whole batches reaching images_wanted after the warm-up and the batches
    prefetched during it."""
    stream = batches(loader, start_epoch)
    images_done, started = 0, None
    untimed = warmup_batches + prefetch_depth(loader)
    try:
        for index, (epoch, step, images, labels) in enumerate(stream):
            if index == untimed:
                synchronize(device)
                started = time.perf_counter()
            out, targets = augment(images, labels, make_generator(seed, 0, epoch, step, device), epoch)
            if started is not None:
                images_done += out.shape[0]
                if images_done >= images_wanted:
                    break
        synchronize(device)
        return images_done, time.perf_counter() - started
    finally:
        stream.close()  # stops DataLoader workers and FFCV's reader thread before the next cell runs


def plot(frame: pd.DataFrame):
    def draw(figure) -> None:
        axis = figure.subplots()
        labels = [f"{r.loader} ({r.workers} w)" if r.workers else r.loader
                  for r in frame.drop_duplicates(["loader", "workers"]).itertuples()]
        cells = frame.drop_duplicates(["loader", "workers"])[["loader", "workers"]].values.tolist()
        sets = list(dict.fromkeys(frame.augment))
        width = 0.8 / len(sets)
        for k, augment in enumerate(sets):
            values = [frame[(frame.loader == lo) & (frame.workers == w) & (frame.augment == augment)].images_per_s
                      for lo, w in cells]
            axis.bar([i + k * width for i in range(len(cells))], [v.iloc[0] if len(v) else 0 for v in values],
                     width, label=augment)
        axis.set_xticks([i + width * (len(sets) - 1) / 2 for i in range(len(cells))], labels)
        axis.set_yscale("log")
        axis.set_ylabel("images/s (log)")
        axis.set_title("Input path throughput: load + augmentation, by loader and augmentation set")
        axis.grid(True, axis="y", alpha=0.3)
        axis.legend()
    return draw


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    info = hardware(device)
    base = bench_config(None, args.data_root, [f"data.beton_dir={args.beton_dir}", *args.overrides])
    if "ffcv" in args.loaders:  # prepare is idempotent: it writes only what is missing or stale
        prepare(base.data, log=lambda message: print(f"[prepare] {message}", flush=True))
    cells = [(loader, workers, augment) for loader in args.loaders
             for workers in ([0] if loader in WORKERLESS else args.workers) for augment in args.augment]
    windows = {cell: [] for cell in cells}
    for repeat in range(args.repeats):  # round-robin, so slow drifts of the machine hit every cell alike
        for loader_name, workers, augment_set in cells:
            print(f"[run] {loader_name}, {workers} workers, {augment_set}, window {repeat + 1}/{args.repeats}",
                  flush=True)
            cfg = cell_config(base, loader_name, augment_set, max(workers, 1), args.seed)
            # Built per window, untimed, so that only one cell's copy of the data is held at a time.
            loader, augment = build_train_input(cfg, DistEnv(device=device), args.batch_size)
            windows[(loader_name, workers, augment_set)].append(
                time_window(loader, augment, device, args.images, args.warmup_batches, args.seed, start_epoch=repeat))
            del loader, augment
    rows = []
    for (loader, workers, augment), timed in windows.items():
        images, seconds = sorted(timed, key=lambda window: window[0] / window[1])[len(timed) // 2]
        rows.append({"loader": loader, "augment": augment, "workers": workers, "images": images,
                     "seconds": seconds, "images_per_s": images / seconds, "batch_size": args.batch_size,
                     "repeats": args.repeats, **info})
    frame = pd.DataFrame(rows)
    most = max(args.workers)
    for augment in args.augment:
        base_rows = frame[(frame.loader == BASELINE) & (frame.workers == most) & (frame.augment == augment)]
        mask = frame.augment == augment
        frame.loc[mask, "vs_torchvision"] = (frame.loc[mask, "images_per_s"] / base_rows.images_per_s.iloc[0]
                                             if len(base_rows) else float("nan"))
    rules = [
        f"batch {args.batch_size}; the first {args.warmup_batches} batches of each cell untimed (FFCV's numba "
        "compilation, worker start-up), and the batches the loader prefetched meanwhile (workers x "
        f"prefetch_factor, FFCV's batches in flight); then at least {args.images} images timed; median of "
        f"{args.repeats} round-robin window(s); CUDA synchronised at both ends",
        "each cell ends in normalised float batches with soft targets, built by engine/build.py's build_train_input",
        f"workers: DataLoader processes (torchvision) or threads (ffcv); the gpu loader has none (0); "
        f"vs_torchvision: against torchvision with {most} workers and the same augmentation set",
    ]
    report = Report(NAME, "Input-path throughput: loaders x augmentation sets x workers", frame, rules, info,
                    plot=plot(frame), columns=["loader", "augment", "workers", "images", "seconds", "images_per_s",
                                               "vs_torchvision"])
    write_report(report, args, argv, quick_size=f"{args.images} images per cell")
    return 0
