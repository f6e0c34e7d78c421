"""Images/s of the whole training input path, for the three loaders on the same cores and data.

Each path starts from the stored data and ends in normalised float batches with soft targets:
load, the reference augmentation set (crop with reflect padding, flip, rotation, colour jitter,
perspective: the AugmentConfig defaults), then mixup/cutmix.
- torchvision: DataLoader with the per-image PIL transforms in `--num-workers` worker processes,
  then the part left for the device (normalise + mix), as the trainer runs it;
- ffcv: FFCV Loader over the betons (written first if missing), full TrainAugment on the device;
- gpu: the split resident on the device as uint8, full TrainAugment.

Each loader runs `--warmup-batches` untimed batches first: they hold the one-off costs, FFCV's
numba compilation (~10 s in a fresh process) and the DataLoader's worker start-up. Then at least
`--images` images are timed (CUDA synchronised at both ends). With `--repeats R` every loader is
timed R times, round-robin, and the median window is reported (the upper one for even R): on a
shared machine one window can catch someone else's burst.

    python benchmarks/loader_throughput.py --data-root DIR [--beton-dir DIR] [--batch-size 512]
        [--images N] [--device cpu|cuda] [--loaders torchvision,ffcv,gpu] [--csv PATH] [--quick]
        [--repeats R] [--threads T]
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from cifar_dist.atomic import write_csv  # noqa: E402
from cifar_dist.augment.pipeline import make_generator  # noqa: E402
from cifar_dist.config import Config, load_config  # noqa: E402
from cifar_dist.data.beton import prepare  # noqa: E402
from cifar_dist.data.cifar import DataError  # noqa: E402
from cifar_dist.engine.build import build_train_input  # noqa: E402
from cifar_dist.engine.distributed import DistEnv  # noqa: E402

LOADERS = ("torchvision", "ffcv", "gpu")
BASELINE = "torchvision"
QUICK_IMAGES = 2048
DEFAULT_CSV = Path(__file__).resolve().parent / "results" / "loader_throughput.csv"
CSV_FIELDS = ("timestamp", "loader", "images", "seconds", "images_per_s", "ratio_vs_torchvision",
              "batch_size", "repeats", "device", "cpu_model", "cpu_cores", "torch_threads", "gpu",
              "num_workers")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    add("--data-root", default=os.environ.get("CIFAR_DIST_DATA"),
        help="folder holding cifar-10-batches-py (default: $CIFAR_DIST_DATA)")
    add("--beton-dir", default="", help="where the betons are, or are written (default: <data-root>/beton)")
    add("--batch-size", type=int, default=512)
    add("--images", type=int, default=20_000, help="images timed per loader (at least)")
    add("--quick", action="store_true", help=f"time {QUICK_IMAGES} images per loader (for CI)")
    add("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    add("--loaders", default=",".join(LOADERS), help=f"comma-separated subset of {', '.join(LOADERS)}")
    add("--csv", type=Path, default=DEFAULT_CSV, help="results file, rewritten by each run")
    add("--num-workers", type=int, default=2, help="data.num_workers for torchvision and ffcv")
    add("--warmup-batches", type=int, default=2)
    add("--repeats", type=int, default=1, help="timed windows per loader; the median one is reported")
    add("--threads", type=int, default=0, help="torch intra-op threads (default: torch's choice)")
    add("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if not args.data_root:
        parser.error("no data: pass --data-root DIR or set CIFAR_DIST_DATA to a folder holding "
                     "cifar-10-batches-py")
    args.loaders = [name.strip() for name in args.loaders.split(",") if name.strip()]
    unknown = sorted(set(args.loaders) - set(LOADERS))
    if unknown or not args.loaders:
        parser.error(f"--loaders takes a comma-separated subset of {', '.join(LOADERS)}; "
                     f"got {', '.join(unknown) or 'nothing'}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda, but torch sees no CUDA device; use --device cpu")
    if min(args.batch_size, args.images, args.repeats) < 1 or args.warmup_batches < 0:
        parser.error("--batch-size, --images and --repeats must be at least 1, --warmup-batches at least 0")
    if args.quick:
        args.images = QUICK_IMAGES
    return args


def hardware(device: torch.device) -> dict:
    """CPU model, usable cores, torch's intra-op threads and the GPU, for the table and the CSV."""
    cpu_model = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            cpu_model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "none"
    return {"cpu_model": cpu_model, "cpu_cores": cores, "torch_threads": torch.get_num_threads(), "gpu": gpu}


def benchmark_config(args: argparse.Namespace) -> Config:
    return load_config(None, [f"data.root={args.data_root}", f"data.beton_dir={args.beton_dir}",
                              f"data.num_workers={args.num_workers}", "data.download=false"])


def build_path(name: str, cfg: Config, args: argparse.Namespace, device: torch.device):
    """(loader, augment) for one path, as the trainer builds them (the run assembly)."""
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, loader=name),
                              train=dataclasses.replace(cfg.train, seed=args.seed))
    return build_train_input(cfg, DistEnv(device=device), args.batch_size)


def batches(loader, start_epoch: int):
    """(epoch, step, images, labels) over successive epochs, without end."""
    epoch = start_epoch
    while True:
        loader.set_epoch(epoch)
        for step, (images, labels) in enumerate(loader):
            yield epoch, step, images, labels
        epoch += 1


def time_window(loader, augment, device: torch.device, images_wanted: int, warmup_batches: int,
                seed: int, start_epoch: int) -> tuple[int, float]:
    """(images, seconds) for the first whole batches reaching images_wanted after the warm-up."""
    synchronize = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    stream = batches(loader, start_epoch)
    images_done, started = 0, None
    try:
        for index, (epoch, step, images, labels) in enumerate(stream):
            if index == warmup_batches:
                synchronize()
                started = time.perf_counter()
            out, targets = augment(images, labels, make_generator(seed, 0, epoch, step, device), epoch)
            if started is not None:
                images_done += out.shape[0]
                if images_done >= images_wanted:
                    break
        synchronize()
        return images_done, time.perf_counter() - started
    finally:
        stream.close()  # stops DataLoader workers and FFCV's reader thread before the next path runs


def format_table(rows: list[dict]) -> str:
    header = f"{'loader':<12} {'images':>8} {'seconds':>8} {'images/s':>10} {'vs torchvision':>15}"
    lines = [header, "-" * len(header)]
    for row in rows:
        ratio = f"{row['ratio_vs_torchvision']:.2f}x" if row["ratio_vs_torchvision"] else "n/a"
        lines.append(f"{row['loader']:<12} {row['images']:>8} {row['seconds']:>8.2f} "
                     f"{row['images_per_s']:>10.0f} {ratio:>15}")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    machine = hardware(device)
    cfg = benchmark_config(args)
    try:
        if "ffcv" in args.loaders:  # prepare is idempotent: it writes only what is missing or stale
            prepare(cfg.data, log=lambda message: print(f"[prepare] {message}", flush=True))
        paths = {name: build_path(name, cfg, args, device) for name in args.loaders}
    except DataError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

    windows = {name: [] for name in args.loaders}
    for repeat in range(args.repeats):  # round-robin, so slow drifts of the machine hit every path alike
        for name, (loader, augment) in paths.items():
            print(f"[run] {name}, window {repeat + 1}/{args.repeats}", flush=True)
            windows[name].append(time_window(loader, augment, device, args.images, args.warmup_batches,
                                             args.seed, start_epoch=repeat))

    timestamp = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    rows = []
    for name, timed in windows.items():
        images, seconds = sorted(timed, key=lambda window: window[0] / window[1])[len(timed) // 2]
        rows.append({"timestamp": timestamp, "loader": name, "images": images, "seconds": round(seconds, 4),
                     "images_per_s": round(images / seconds, 1), "batch_size": args.batch_size,
                     "repeats": args.repeats, "device": str(device), "num_workers": args.num_workers,
                     **machine})
    baseline = next((row["images_per_s"] for row in rows if row["loader"] == BASELINE), None)
    for row in rows:
        row["ratio_vs_torchvision"] = round(row["images_per_s"] / baseline, 2) if baseline else ""

    print()
    print(f"hardware: {machine['cpu_model']}, {machine['cpu_cores']} cores, {machine['torch_threads']} torch "
          f"threads, GPU: {machine['gpu']}; device {device}, batch {args.batch_size}, "
          f"{args.num_workers} loader workers; first {args.warmup_batches} batches untimed "
          f"(FFCV's numba compilation, worker start-up)")
    print(format_table(rows))
    args.csv.parent.mkdir(parents=True, exist_ok=True)
    write_csv(args.csv, list(CSV_FIELDS), ([row[key] for key in CSV_FIELDS] for row in rows))
    print(f"wrote {args.csv}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
