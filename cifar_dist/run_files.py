"""The files of a run folder, by name, and the writers of those that training and `evaluate` share.

One schema each: `per_class.csv` (class, support, then precision, recall and F1 of each set of
weights scored), `confusion_matrix.csv` (rows: actual class, columns: predicted class) and
`final.json` (accuracy and loss at the end, per weights and TTA level). Torch-free, so that the
commands that only read runs (`sweep-summary`, `compare`) stay light.
"""
from __future__ import annotations

import fcntl
import json
from pathlib import Path

from cifar_dist.atomic import atomic_write, write_csv

PLAN = "plan.json"  # what the launch resolved the config to
CONFIG = "config.yaml"  # the whole config: `--config RUN_DIR/config.yaml` trains the same recipe
LAST = "last.pt"
PREVIOUS = "last.prev.pt"  # the checkpoint before last.pt, kept until the new one is whole
BEST = "best.pt"
BEST_EMA = "best_ema.pt"
METRICS = "metrics.jsonl"  # one JSON line per epoch
SUMMARY = "summary.csv"  # the same records as a table
HISTORY_PLOT = "training_history.png"
PER_CLASS = "per_class.csv"
CONFUSION = "confusion_matrix.csv"
FINAL = "final.json"
TRAIN_LOG = "train.log"  # rank 0's console output, appended across resumes
STATUS = "status.json"  # running, finished, max_steps, stopped, diverged, failed (with the cause)
SLURM = "slurm.json"  # `cifar-dist slurm`: the job's starts, requeues and status
JOB_ID = "job_id"  # a launcher restart or Slurm requeue finds its run folder by it
LOCK = "run.lock"  # held by the run's rank 0 while it trains
SCORES = ("precision", "recall", "f1")


def find_runs(folders) -> list[Path]:
    """Every run folder at or below the folders (one holding config.yaml or final.json), sorted; a run's own
    subfolders (wandb's files/config.yaml) are not runs."""
    candidates = {file.parent for folder in map(Path, folders) for name in (CONFIG, FINAL) for file in folder.rglob(name)}
    return sorted(run for run in candidates if not any(parent in candidates for parent in run.parents))


def is_locked(run_dir: Path) -> bool:
    """Whether a process holds the run folder's lock now (False when there is no lock file)."""
    try:
        with open(Path(run_dir) / LOCK) as probe:
            try:
                fcntl.flock(probe, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                return True
            fcntl.flock(probe, fcntl.LOCK_UN)
            return False
    except OSError:
        return False


def write_json(path: Path, data, fsync: bool = False) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(data, indent=2) + "\n"), fsync=fsync)


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())


def per_class_rows(class_names, scores: dict[str, dict]) -> tuple[list[str], list[list]]:
    """(columns, rows) of the per-class table; scores: {weights: metrics.per_class_scores(...)}."""
    columns = ["class", "support"] + [f"{kind}_{metric}" for kind in scores for metric in SCORES]
    support = next(iter(scores.values()))["support"]
    rows = [[name, int(support[i])] + [float(scores[kind][metric][i]) for kind in scores for metric in SCORES]
            for i, name in enumerate(class_names)]
    return columns, rows


def write_per_class(path: Path, class_names, scores: dict[str, dict]) -> None:
    write_csv(path, *per_class_rows(class_names, scores))


def write_confusion(path: Path, class_names, confusion) -> None:
    write_csv(path, ["actual/predicted", *class_names],
              [[name, *(int(count) for count in counts)] for name, counts in zip(class_names, confusion)])


def run_status(run_dir: Path) -> tuple[str, str]:
    """(status, cause) of a run folder: finished, max_steps, stopped, diverged, failed, crashed, running, or
    Slurm's requeued / cancelled. A status.json that says running while nobody holds the folder's lock
    means the process died without a word (SIGKILL, a lost node): crashed."""
    status = read_json(run_dir / STATUS) if (run_dir / STATUS).is_file() else {}
    slurm = read_json(run_dir / SLURM) if (run_dir / SLURM).is_file() else {}
    word, cause = status.get("status"), status.get("cause") or ""
    if slurm.get("status") in ("requeued", "cancelled") and word in (None, "running", "stopped"):
        return slurm["status"], slurm.get("cause") or ""
    if word is None:
        return slurm.get("status", "running"), slurm.get("cause") or ""
    if word == "running" and not is_locked(run_dir):
        return "crashed", "status.json says running, but no process holds the run folder (killed?)"
    return word, cause
