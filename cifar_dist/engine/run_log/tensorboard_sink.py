"""TensorBoard (logging.tensorboard=true): each epoch's scalars as events in run.dir/tensorboard/, at the
record's global_step, the same numbers as metrics.jsonl and wandb; and the check that the package is there."""
from __future__ import annotations

import importlib.util
from pathlib import Path

from cifar_dist.engine.run_log import LogSink
from cifar_dist.errors import ConfigError

FOLDER = "tensorboard"


def check_tensorboard(enabled: bool) -> None:
    """Refuse logging.tensorboard=true without the package, before anything starts."""
    if enabled and importlib.util.find_spec("tensorboard") is None:
        raise ConfigError("logging.tensorboard=true needs the 'tensorboard' package: pip install -e .[tensorboard] "
                          "(or pip install tensorboard), or set logging.tensorboard=false")


class TensorBoardRun(LogSink):
    def __init__(self, run_dir: Path):
        self.folder = run_dir / FOLDER
        self.writer = None
        # Events past the checkpoint a run resumes from (written before a crash) are hidden by TensorBoard once
        # the new writer says it restarts there; a fresh run restarts at 0.
        self.restart_step = 0
        self.last_step = 0

    def load_history(self, history: list[dict]) -> None:
        self.restart_step = int(history[-1].get("global_step", 0)) + 1 if history else 0

    def end_epoch(self, record: dict, history: list[dict]) -> None:
        step = int(record.get("global_step", record.get("epoch", 0)))
        for key, value in record.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                self._writer().add_scalar(key, value, global_step=step)
        self._writer().flush()
        self.last_step = step

    def final(self, final: dict, scores: dict[str, dict], confusion, class_names) -> None:
        for kind, result in (final or {}).items():
            self._writer().add_scalar(f"final/{kind}_acc", result["acc"], global_step=self.last_step)
        self._writer().flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None

    def _writer(self):
        if self.writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(self.folder), purge_step=self.restart_step)
        return self.writer
