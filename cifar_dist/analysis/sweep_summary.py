"""`cifar-dist sweep-summary DIR`: one table of every run under DIR (a sweep, or any folder of runs).

A run is a folder with the config.yaml the trainer writes. Its row: the keys whose values differ
between the runs (the swept ones), best and final val accuracy of the model and its EMA, epochs,
images/s, the accuracies of final.json (`end_model_acc`, `end_ema_tta2_acc`, ...), and the status
and its cause (`run_files.run_status`: finished, max_steps, stopped, diverged, failed, crashed, running;
requeued or cancelled from Slurm's slurm.json).
"""
from __future__ import annotations

from pathlib import Path

import yaml

from cifar_dist import run_files
from cifar_dist.errors import ArgumentParser, ConfigError
from cifar_dist.outputs import check_writable, write_together
from cifar_dist.tables import markdown_table

SUMMARY_NAME = "sweep_summary"
METRIC_COLUMNS = ["status", "cause", "epochs", "best_val_acc", "final_val_acc", "best_ema_val_acc", "final_ema_val_acc",
                  "images_per_s"]


def flatten(mapping: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in mapping.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value if not isinstance(value, list) else str(value)
    return flat


def run_row(run_dir: Path) -> tuple[dict, dict]:
    """(flattened config, metrics) of one run."""
    import pandas as pd

    config = flatten(yaml.safe_load((run_dir / run_files.CONFIG).read_text()) or {})
    status, cause = run_files.run_status(run_dir)
    row = {"run": str(run_dir), "status": status, "cause": cause, "epochs": 0}
    summary = run_dir / run_files.SUMMARY
    if summary.is_file():
        history = pd.read_csv(summary)
        row["epochs"] = len(history)
        for column, name in (("val_acc", "val_acc"), ("ema_val_acc", "ema_val_acc")):
            if column in history:
                row[f"best_{name}"], row[f"final_{name}"] = history[column].max(), history[column].iloc[-1]
        if "images_per_s" in history:
            row["images_per_s"] = history["images_per_s"].mean()
    final = run_dir / run_files.FINAL
    if final.is_file():  # the end of the run: model and EMA, without and with TTA
        row.update({f"end_{kind}_acc": result["acc"] for kind, result in run_files.read_json(final).items()})
    return config, row


def collect(root: Path):
    """A pandas table, one row per run under root, with the swept keys as leading columns."""
    import pandas as pd

    runs = [run for run in run_files.find_runs([root]) if (run / run_files.CONFIG).is_file()]
    if not runs:
        raise ConfigError(f"no runs under {root}: expected folders holding the config.yaml the trainer writes")
    configs, rows = zip(*(run_row(run) for run in runs))
    keys = sorted({key for config in configs for key in config})
    swept = [key for key in keys if len({str(config.get(key)) for config in configs}) > 1 and key != "run.name"]
    table = pd.DataFrame([{**{key: config.get(key) for key in swept}, **row} for config, row in zip(configs, rows)])
    end_columns = sorted(c for c in table if c.startswith("end_"))
    columns = swept + [c for c in METRIC_COLUMNS if c in table] + end_columns + ["run"]
    return table[columns]


def main(argv: list[str]) -> int:
    parser = ArgumentParser(prog="cifar-dist sweep-summary", description=__doc__.split("\n\n")[0])
    parser.add_argument("root", type=Path, help="folder holding the runs (e.g. a sweep's folder under runs/slurm)")
    parser.add_argument("--sort-by", help="column to sort by, descending (default: best_val_acc once an epoch "
                                          "has finished)")
    parser.add_argument("--out", type=Path, help="folder for sweep_summary.csv/.md (default: root)")
    args = parser.parse_args(argv)
    out = args.out or args.root
    check_writable(out, "--out" if args.out else "the runs' folder", folder=True)
    table = collect(args.root)
    if args.sort_by and args.sort_by not in table:
        raise ConfigError(f"--sort-by {args.sort_by!r} is not a column; columns: {', '.join(table.columns)}")
    sort_by = args.sort_by or ("best_val_acc" if "best_val_acc" in table else None)
    if sort_by:
        table = table.sort_values(sort_by, ascending=False, kind="stable")
    markdown = markdown_table(table) + "\n"
    write_together({out / f"{SUMMARY_NAME}.csv": lambda tmp: table.to_csv(tmp, index=False),
                    out / f"{SUMMARY_NAME}.md": lambda tmp: tmp.write_text(markdown)})
    print(markdown, end="")
    print(f"wrote {out / SUMMARY_NAME}.csv and .md")
    return 0
