"""The run folder's record of the run: metrics.jsonl and summary.csv (one record per epoch, always equal
to the history), training_history.png (redrawn each epoch), and at the end final.json, per_class.csv
and confusion_matrix.csv (`cifar_dist.run_files`)."""
from __future__ import annotations

import json
from pathlib import Path

from cifar_dist import run_files
from cifar_dist.atomic import atomic_write, write_csv
from cifar_dist.engine.run_log import LogSink


class RunFiles(LogSink):
    def __init__(self, run_dir: Path, plot: bool):
        self.run_dir, self.plot = run_dir, plot
        # Until the first write, metrics.jsonl may hold lines of an earlier process that are not in the
        # history (a run that died before its first checkpoint): the first write replaces it.
        self.metrics_match_history = False

    def end_epoch(self, record: dict, history: list[dict]) -> None:
        if self.metrics_match_history:
            with open(self.run_dir / run_files.METRICS, "a") as metrics_file:
                metrics_file.write(json.dumps(record) + "\n")
        else:
            self._write_metrics(history)
        self._write_summary_and_plot(history)

    def load_history(self, history: list[dict]) -> None:
        self._write_metrics(history)
        self._write_summary_and_plot(history)

    def final(self, final: dict, scores: dict[str, dict], confusion, class_names) -> None:
        if final:
            run_files.write_json(self.run_dir / run_files.FINAL, final)
        run_files.write_per_class(self.run_dir / run_files.PER_CLASS, class_names, scores)
        run_files.write_confusion(self.run_dir / run_files.CONFUSION, class_names, confusion)

    def _write_metrics(self, history: list[dict]) -> None:
        lines = "".join(json.dumps(record) + "\n" for record in history)
        atomic_write(self.run_dir / run_files.METRICS, lambda tmp: tmp.write_text(lines), fsync=False)
        self.metrics_match_history = True

    def _write_summary_and_plot(self, history: list[dict]) -> None:
        summary, plot = self.run_dir / run_files.SUMMARY, self.run_dir / run_files.HISTORY_PLOT
        if not history:
            summary.unlink(missing_ok=True)
            plot.unlink(missing_ok=True)
            return
        columns = list(dict.fromkeys(key for record in history for key in record))
        write_csv(summary, columns, [[record.get(key, "") for key in columns] for record in history])
        if self.plot:
            from cifar_dist.plots import plot_history

            try:
                plot_history(history, plot)
            except ImportError:
                print(f"note: matplotlib is not installed, so {plot.name} is not drawn; pip install matplotlib",
                      flush=True)
                self.plot = False
