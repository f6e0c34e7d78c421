"""The one summary table at the end of benchmarks/gpu_check.sh, from the results it wrote.

    python benchmarks/gpu_summary.py --results DIR --status STATUS.tsv [--tests-log LOG] [--out FILE.md]
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from cifar_dist.atomic import atomic_write  # noqa: E402
from cifar_dist.tables import format_cell, markdown_table  # noqa: E402


def newest(results: Path, name: str) -> Path | None:
    """The most recent <name>.csv under results/<hardware>-<date>/."""
    found = sorted(results.glob(f"*/{name}.csv"), key=lambda p: p.stat().st_mtime)
    return found[-1] if found else None


def hardware_line(csv_path: Path | None) -> str:
    if csv_path is None:
        return "unknown (no results)"
    md = csv_path.with_suffix(".md").read_text() if csv_path.with_suffix(".md").is_file() else ""
    match = re.search(r"^- hardware: (.*)$", md, flags=re.MULTILINE)
    date = re.search(r"^- date: (.*)$", md, flags=re.MULTILINE)
    return f"{match.group(1) if match else 'unknown'}; {date.group(1) if date else ''}"


def rows_of_steps(status: Path, tests_log: Path | None) -> list[dict]:
    rows = []
    tests_line = ""
    if tests_log and tests_log.is_file():
        lines = [line for line in tests_log.read_text().splitlines() if re.search(r"\d+ (passed|failed|skipped)", line)]
        tests_line = lines[-1].strip("= ") if lines else ""
    for line in status.read_text().splitlines():
        name, outcome, seconds = line.split("\t")
        detail = f"{outcome}, {seconds} s" + (f": {tests_line}" if name == "tests" and tests_line else "")
        rows.append({"check": name, "what": "step of gpu_check.sh", "result": detail})
    return rows


def throughput_rows(path: Path | None) -> list[dict]:
    if path is None:
        return []
    frame = pd.read_csv(path)
    rows = []
    for r in frame.itertuples():
        if pd.isna(r.images_per_s):
            result = str(r.note) if isinstance(r.note, str) else "not measured"
        else:
            memory = f", peak {format_cell(float(r.peak_memory_mb))} MiB" if not pd.isna(r.peak_memory_mb) else ""
            result = f"{format_cell(float(r.images_per_s))} images/s ({float(r.vs_baseline):.2f}x baseline){memory}"
        batch = f", batch {int(r.batch)}" if "batch" in frame and not pd.isna(r.batch) else ""
        rows.append({"check": "train_throughput", "what": f"{r.model}: {r.toggle}{batch}", "result": result})
    return rows


def overhead_rows(path: Path | None) -> list[dict]:
    if path is None:
        return []
    rows = []
    for r in pd.read_csv(path).itertuples():
        rows.append({"check": "overhead", "what": f"{r.model} (batch {r.batch}, amp {r.amp}, compile {r.compile})",
                     "result": f"Trainer / bare loop {r.ratio_median:.3f} (min {r.ratio_min:.3f}, max {r.ratio_max:.3f}, "
                               f"{r.repeats} repeats); {r.trainer_images_per_s:,.0f} vs {r.bare_images_per_s:,.0f} images/s"})
    return rows


def accuracy_rows(path: Path | None) -> list[dict]:
    if path is None:
        return []
    rows = []
    for r in pd.read_csv(path).itertuples():
        spread = f" ± {r.time_std_s:.2f}" if not pd.isna(r.time_std_s) else ""
        rows.append({"check": "time_to_accuracy",
                     "what": f"{Path(r.config).name}, {r.train_images:,} training images, {r.epochs:g} epochs, "
                             f"{r.eval_split} split, target {r.target:.2%}",
                     "result": f"final accuracy {r.acc_mean:.4f} over {r.runs} runs, {r.reached_fraction:.0%} reached "
                               f"the target; {r.time_mean_s:.2f}{spread} s a run"})
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", type=Path, required=True)
    parser.add_argument("--status", type=Path, required=True, help="name<TAB>outcome<TAB>seconds per step")
    parser.add_argument("--tests-log", type=Path, default=None)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--elapsed-s", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    paths = {name: newest(args.results, name) for name in ("train_throughput", "overhead", "time_to_accuracy")}
    rows = [*rows_of_steps(args.status, args.tests_log), *throughput_rows(paths["train_throughput"]),
            *overhead_rows(paths["overhead"]), *accuracy_rows(paths["time_to_accuracy"]),
            {"check": "total", "what": "the whole gpu_check.sh", "result": f"{args.elapsed_s} s"}]
    hardware = hardware_line(next((p for p in paths.values() if p is not None), None))
    dry = " (dry run on the CPU: tiny sizes, no GPU figures)" if args.device == "cpu" else ""
    text = "\n".join([f"# GPU check{dry}", "", f"- hardware: {hardware}",
                      f"- results: {args.results}", "", markdown_table(pd.DataFrame(rows)), ""])
    print("\n" + text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(args.out, lambda tmp: tmp.write_text(text), fsync=False)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
