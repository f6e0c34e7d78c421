"""What every benchmark shares: arguments, the hardware in words, the results folder, timing of
real training epochs, and the report (CSV with pandas, a markdown table, a PNG plot).

Results go to `<results>/<hardware>-<date>/` (default `benchmarks/results/`, relative to the
working directory): `<name>.csv`, `<name>.md` (hardware, date, command, timing rules, table) and
`<name>.png` when matplotlib is installed. Every file is written whole or not at all.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import json
import os
import re
import shlex
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import yaml

from cifar_dist import plots
from cifar_dist.atomic import atomic_write
from cifar_dist.config import Config, load_config
from cifar_dist.errors import ConfigError, ExitCode, UserError
from cifar_dist.hardware import cpu_model
from cifar_dist.tables import markdown_table

DEFAULT_RESULTS = Path("benchmarks") / "results"
PACKAGE_ROOT = Path(__file__).resolve().parents[2]  # the checkout, when running from one
# Settings every benchmark run gets: no downloads, no plots or wandb, a fresh run each time, no checkpoint on
# the timer (one would land in whichever timed epoch the clock picks).
QUIET_RUN = ("data.download=false", "logging.plot=false", "logging.wandb.mode=disabled", "train.resume=never",
             "train.checkpoint_interval_min=0")


def add_common_arguments(parser: argparse.ArgumentParser, quick_help: str) -> None:
    """--quick, --results, --device, --data-root and trailing config overrides."""
    add = parser.add_argument
    add("--quick", action="store_true", help=quick_help)
    add("--results", type=Path, default=DEFAULT_RESULTS,
        help="results are written to RESULTS/<hardware>-<date>/ (default: benchmarks/results)")
    add("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    add("--threads", type=int, default=0, help="torch intra-op threads (default: torch's choice; 1 with --quick "
                                               "on the CPU, where busy cores make more threads wait on each other)")
    add("--data-root", default=os.environ.get("CIFAR_DIST_DATA"),
        help="folder holding cifar-10-batches-py, the .tar.gz or cifar10.npz (default: $CIFAR_DIST_DATA)")
    add("overrides", nargs="*", metavar="key.sub=value", help="config overrides applied to every run")


def check_common_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.data_root is None:
        parser.error("no data: pass --data-root DIR or set CIFAR_DIST_DATA to a folder holding "
                     "cifar-10-batches-py, cifar-10-python.tar.gz or cifar10.npz")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda, but torch sees no CUDA device; use --device cpu")
    if args.threads < 0:
        parser.error(f"--threads must be at least 0 (0: torch's choice); got {args.threads}")
    if args.threads == 0 and args.quick and args.device == "cpu":
        args.threads = 1
    if args.threads:
        torch.set_num_threads(args.threads)


def csv_list(text: str, allowed: tuple | None = None, what: str = "values") -> list[str]:
    """'a,b' → ['a', 'b'], each checked against allowed."""
    items = [item.strip() for item in text.split(",") if item.strip()]
    unknown = [item for item in items if allowed is not None and item not in allowed]
    if unknown or not items:
        raise ConfigError(f"{what} takes a comma-separated subset of {', '.join(allowed or ())}; "
                         f"got {', '.join(unknown) or 'nothing'}")
    return items


# --- the machine -------------------------------------------------------------------------------

def hardware(device: torch.device) -> dict:
    """CPU model and usable cores, torch's threads, the GPU and the torch build, for tables and CSVs."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "none"
    return {"cpu_model": cpu_model(), "cpu_cores": cores, "torch_threads": torch.get_num_threads(), "gpu": gpu,
            "torch": torch.__version__, "device": str(device)}


def single_process(args) -> tuple[object, dict]:
    """(DistEnv of one process on --device, the hardware in words) for a benchmark that runs in this process."""
    from cifar_dist.engine.distributed import DistEnv

    env = DistEnv(device=torch.device(args.device))
    return env, hardware(env.device)


def hardware_line(info: dict) -> str:
    return (f"{info['cpu_model']} ({info['cpu_cores']} cores, {info['torch_threads']} torch threads), "
            f"GPU: {info['gpu']}, torch {info['torch']}, device {info['device']}")


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"


def results_folder(base: Path, info: dict, date: datetime.date | None = None) -> Path:
    """base/<GPU name, or CPU model and cores>-<YYYY-MM-DD>."""
    machine = slug(info["gpu"]) if info["gpu"] != "none" else f"{slug(info['cpu_model'])}-{info['cpu_cores']}c"
    return Path(base) / f"{machine}-{(date or datetime.date.today()).isoformat()}"


# --- configs and timing ------------------------------------------------------------------------

def recipe_path(model: str) -> Path:
    """The recipe of a model: the first configs/*.yaml (by name) that trains it, else configs/default.yaml;
    from the working directory's configs/ or the checkout's this package runs from."""
    places = [Path.cwd() / "configs", PACKAGE_ROOT / "configs"]
    folder = next((place for place in places if (place / "default.yaml").is_file()), None)
    if folder is None:
        raise ConfigError(f"no recipes in {' or '.join(map(str, places))}; run from the repository root or pass "
                          "--config FILE")
    for path in sorted(folder.glob("*.yaml")):
        model_section = (yaml.safe_load(path.read_text()) or {}).get("model") or {}
        if model_section.get("name") == model:
            return path
    return folder / "default.yaml"


def model_settings(model: str, quick: bool) -> list[str]:
    """Overrides that pick a registered model, at its registered tiny size with --quick."""
    from cifar_dist.models import MODELS

    if model not in MODELS:
        raise ConfigError(f"unknown model {model!r}; registered: {', '.join(MODELS)}")
    tiny = MODELS[model].tiny if quick else {}
    return [f"model.name={model}", *(f"model.{key}={json.dumps(value)}" for key, value in tiny.items())]


def registered_models() -> tuple[str, ...]:
    from cifar_dist.models import MODELS

    return tuple(sorted(MODELS))


def bench_config(config_path: Path | str | None, data_root: str | None, overrides: list[str],
                 settings: list[str] = ()) -> Config:
    """The recipe, the user's overrides, then the settings a measurement needs (they win)."""
    data = [f"data.root={data_root}"] if data_root else []
    return load_config(config_path, [*data, *QUIET_RUN, *overrides, *settings])


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def quiet_trainer(cfg: Config, env):
    """The real Trainer, its start-up messages silenced."""
    from cifar_dist.engine.trainer import Trainer

    return Trainer(cfg, env, log=lambda *args, **kwargs: None)


def time_epoch(trainer, evaluate: bool = False, save: bool = False) -> float:
    """Seconds of one epoch of the real training loop (`Trainer.run_epoch`): by default the steps alone, no
    evaluation and no checkpoint write (the time-based one included)."""
    device = trainer.env.device
    synchronize(device)
    started = time.perf_counter()
    outcome = trainer.run_epoch(evaluate=evaluate, save=save)
    synchronize(device)
    if outcome is not None:
        raise ConfigError(f"the training loop stopped early: {outcome.description}")
    return time.perf_counter() - started


@dataclass
class EpochTimes:
    """Timed epochs of one configuration of the real training loop."""

    seconds: list[float]
    plan: object  # engine.build.RunPlan
    peak_memory_mb: float  # CUDA's max_memory_allocated over the timed epochs; NaN on the CPU

    @property
    def images_per_s(self) -> float:
        """Over all ranks, from the median epoch."""
        return self.plan.steps_per_epoch * self.plan.global_batch_size / statistics.median(self.seconds)


def measure_epochs(cfg: Config, env, repeats: int, run_dir: str | Path) -> EpochTimes:
    """One untimed warm-up epoch of the real Trainer, then `repeats` timed epochs (cfg.train.epochs
    must cover them all); the trainer is dropped before this returns."""
    cfg = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, dir=str(run_dir)))
    trainer = quiet_trainer(cfg, env)
    try:
        time_epoch(trainer)  # compile, cuDNN autotuning, optimizer state, allocator warm-up
        if env.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(env.device)
        seconds = [time_epoch(trainer) for _ in range(repeats)]
        peak = torch.cuda.max_memory_allocated(env.device) / 2**20 if env.device.type == "cuda" else float("nan")
        return EpochTimes(seconds, trainer.run.plan, peak)
    finally:
        trainer.close()
        del trainer
        free_device_memory(env.device)


def free_device_memory(device: torch.device) -> None:
    """Let the next configuration start from an empty device (peak memory is per configuration)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def run_folder() -> tempfile.TemporaryDirectory:
    """A throw-away run.dir for trainers built by a benchmark."""
    return tempfile.TemporaryDirectory(prefix="cifar_dist_bench_")


# --- the report --------------------------------------------------------------------------------

@dataclass
class Report:
    """One benchmark's results: the table, what it means, and how to draw it."""

    name: str
    title: str
    frame: object  # pandas.DataFrame
    rules: list[str]
    info: dict
    plot: Callable | None = None  # plot(figure) draws on a matplotlib Figure
    columns: list[str] | None = None  # columns of the markdown table (default: all)
    notes: list[str] = field(default_factory=list)
    extra_csv: dict = field(default_factory=dict)  # suffix → DataFrame, written as <name>_<suffix>.csv


def draw_png(plot: Callable, path: Path) -> bool:
    """Draw plot(figure) into path; False when matplotlib is not installed (the report notes it)."""
    try:
        plots.draw_png(plot, path)
    except ImportError:
        return False
    return True


def command_line(name: str, argv: list[str] | None) -> str:
    """The command that reproduces a run."""
    return shlex.join(["cifar-dist", "bench", name, *(sys.argv[1:] if argv is None else argv)])


def write_report(report: Report, args: argparse.Namespace, argv: list[str] | None, quick_size: str) -> Path:
    """CSV, markdown and PNG of report into the results folder (--results); prints the table and where
    it wrote. quick_size: what --quick shrinks the run to, noted when it was given."""
    if args.quick:
        report.notes.append(f"--quick: {quick_size}; the figures test the script, not the machine")
    command = command_line(report.name, argv)
    folder = results_folder(args.results, report.info)
    folder.mkdir(parents=True, exist_ok=True)
    csv_path, md_path, png_path = (folder / f"{report.name}.{ext}" for ext in ("csv", "md", "png"))
    atomic_write(csv_path, lambda tmp: report.frame.to_csv(tmp, index=False), fsync=False)
    extra_paths = [folder / f"{report.name}_{suffix}.csv" for suffix in report.extra_csv]
    for path, frame in zip(extra_paths, report.extra_csv.values()):
        atomic_write(path, lambda tmp, frame=frame: frame.to_csv(tmp, index=False), fsync=False)
    notes = list(report.notes)
    drawn = report.plot is not None and draw_png(report.plot, png_path)
    if report.plot is not None and not drawn:
        notes.append(f"{png_path.name} not drawn: matplotlib is not installed (pip install matplotlib)")
    table = markdown_table(report.frame, report.columns)
    stamp = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    lines = [f"# {report.title}", "", f"- hardware: {hardware_line(report.info)}", f"- date: {stamp}",
             f"- command: `{command}`", *(f"- {rule}" for rule in report.rules), "", table, ""]
    if drawn:
        lines += [f"![{report.name}]({png_path.name})", ""]
    lines += [f"Note: {note}" for note in notes]
    atomic_write(md_path, lambda tmp: tmp.write_text("\n".join(lines).rstrip() + "\n"), fsync=False)
    print(f"\n{report.title}\nhardware: {hardware_line(report.info)}")
    for rule in report.rules:
        print(f"  {rule}")
    print(table)
    for note in notes:
        print(f"note: {note}")
    written = [csv_path, *extra_paths, md_path] + ([png_path] if drawn else [])
    print("wrote " + ", ".join(str(p) for p in written), flush=True)
    return folder


def run_main(main: Callable[[list[str] | None], int], argv: list[str] | None) -> int:
    """A benchmark's main with user errors as one line and exit code 2."""
    try:
        return main(argv)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return ExitCode.USER_ERROR
