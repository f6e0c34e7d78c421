"""Everything a training run reports, on rank 0 only: `RunLogger` hands each event to its sinks.

Sinks (`LogSink` subclasses, each a no-op where it has nothing to do):
  terminal.py    progress bar on a terminal or plain lines with ETAs for logs (pace.py times the steps), the
                 whole run's estimate once, the epoch summary, the final tables
  files.py       the run folder: metrics.jsonl, summary.csv, training_history.png, final.json,
                 per_class.csv, confusion_matrix.csv (names and shared writers in `cifar_dist.run_files`)
  wandb_sink.py  a wandb run (online or offline), continued across resumes by its id
  tensorboard_sink.py  TensorBoard events in run.dir/tensorboard/ (logging.tensorboard=true)
The logger keeps the history (one record per epoch), which a resumed run takes from its checkpoint.
"""
from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

from cifar_dist.config import LoggingConfig


class RunLength(NamedTuple):
    """What the ETAs need to know of the run."""
    stop_step: int  # the global step this launch ends at
    steps_per_epoch: int
    images_per_step: int


class LogSink:
    """One place a run reports to; the logger calls these in order, each may ignore what it does not show."""

    def start_epoch(self, epoch: int, num_steps: int) -> None:
        pass

    def step(self, step_in_epoch: int, global_step: int, loss, lr: float) -> None:
        pass

    def end_epoch(self, record: dict, history: list[dict]) -> None:
        pass

    def load_history(self, history: list[dict]) -> None:
        pass

    def final(self, final: dict, scores: dict[str, dict], confusion, class_names) -> None:
        pass

    def attach(self, paths: list[Path]) -> None:
        """Files of the run worth keeping with its record (the profiler's)."""
        pass

    def close(self) -> None:
        pass


class RunLogger:
    """Progress, metric files, plots and wandb for one run; every method is a no-op unless enabled."""

    def __init__(self, run_dir: Path, cfg: LoggingConfig, enabled: bool, config_dict: dict,
                 wandb_run_id: str | None = None, length: RunLength | None = None):
        """enabled: True on rank 0 only. wandb_run_id: the id stored in a checkpoint, to continue its run.
        length: for the whole run's ETA (without it the progress lines give the epoch's only)."""
        from cifar_dist.engine.run_log.files import RunFiles
        from cifar_dist.engine.run_log.terminal import Terminal

        self.enabled = enabled
        self.history: list[dict] = []
        self.wandb_run_id = wandb_run_id
        self.sinks: list[LogSink] = []
        if not enabled:
            return
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        self.sinks = [Terminal(cfg.print_every_steps, length), RunFiles(Path(run_dir), cfg.plot)]
        if cfg.tensorboard:
            from cifar_dist.engine.run_log.tensorboard_sink import TensorBoardRun

            self.sinks.append(TensorBoardRun(Path(run_dir)))
        if cfg.wandb.mode != "disabled":
            from cifar_dist.engine.run_log.wandb_sink import WandbRun

            wandb_sink = WandbRun(Path(run_dir), cfg.wandb, config_dict, wandb_run_id)
            self.wandb_run_id = wandb_sink.run_id
            self.sinks.append(wandb_sink)

    def start_epoch(self, epoch: int, num_steps: int) -> None:
        """Begin an epoch of num_steps optimizer steps."""
        for sink in self.sinks:
            sink.start_epoch(epoch, num_steps)

    def step(self, step_in_epoch: int, global_step: int, loss, lr: float) -> None:
        """One optimizer step (step_in_epoch counts from 1); loss is a number or a 0-dim tensor, read only
        when a sink shows it (reading a CUDA tensor waits for the device)."""
        for sink in self.sinks:
            sink.step(step_in_epoch, global_step, loss, lr)

    def end_epoch(self, record: dict) -> None:
        """Add one epoch's metrics to the history and report them."""
        if not self.enabled:
            return
        record = {key: _plain(value) for key, value in record.items()}
        self.history.append(record)
        for sink in self.sinks:
            sink.end_epoch(record, self.history)

    def load_history(self, records: list[dict]) -> None:
        """Make the history of a checkpoint the history; later epochs in the files are dropped."""
        if not self.enabled:
            return
        self.history = [{key: _plain(value) for key, value in record.items()} for record in records]
        for sink in self.sinks:
            sink.load_history(self.history)

    def log_final(self, final: dict, scores: dict[str, dict], confusion, class_names) -> None:
        """The end of the run: final: {"model": {"acc", "loss", "count"}, "ema_tta2": {...}, ...}; scores:
        {weights: metrics.per_class_scores(...)}; confusion[actual][predicted] of the model."""
        for sink in self.sinks:
            sink.final(final, scores, confusion, class_names)

    def attach(self, paths: list[Path]) -> None:
        """Keep these files with the run's record where a sink can (wandb saves them with its run)."""
        for sink in self.sinks:
            sink.attach(paths)

    def close(self) -> None:
        """Close the progress bar, finish the wandb run and wait until wandb has written it."""
        for sink in self.sinks:
            sink.close()


def _plain(value):
    """A numpy or torch scalar as the Python number it holds; anything else unchanged."""
    item = getattr(value, "item", None)
    return item() if callable(item) else value
