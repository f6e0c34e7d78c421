"""Everything a training run reports: progress, metric files, plots and wandb — on rank 0 only.

Files under the run folder:
  metrics.jsonl          one JSON line per epoch; always equal to the logger's history
  summary.csv            the same history as a table, one row per epoch
  training_history.png   loss and accuracy curves (train, val, EMA val)
  per_class.csv          per-class accuracy, precision, recall, F1 of the model and its EMA, and support
  confusion_matrix.csv   rows: actual class, columns: predicted class
  final.json             accuracy and loss at the end, model and EMA, without and with TTA
  wandb/offline-run-*    with logging.wandb.mode=offline; upload later with `wandb sync`
"""
from __future__ import annotations

import importlib.util
import json
import math
import netrc
import os
import secrets
import socket
import string
import sys
from pathlib import Path
from urllib.parse import urlsplit

from cifar_dist.atomic import atomic_write, write_csv
from cifar_dist.config import LoggingConfig, WandbConfig
from cifar_dist.errors import ConfigError

METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.csv"
PLOT_FILE = "training_history.png"
PER_CLASS_FILE = "per_class.csv"
CONFUSION_FILE = "confusion_matrix.csv"
FINAL_FILE = "final.json"

_WANDB_ID_ALPHABET = string.ascii_lowercase + string.digits
_WANDB_ID_LENGTH = 8

# Groups of the one-line epoch summary: a label, then (record key, format) pairs; absent keys are skipped.
_SUMMARY_GROUPS = (
    ("train", (("train_loss", "loss {:.4f}"), ("train_acc", "acc {:.4f}"))),
    ("val", (("val_loss", "loss {:.4f}"), ("val_acc", "acc {:.4f}"))),
    ("ema val", (("ema_val_loss", "loss {:.4f}"), ("ema_val_acc", "acc {:.4f}"))),
    ("", (("lr", "lr {:.4g}"),)),
    ("", (("images_per_s", "{:.0f} img/s"), ("epoch_s", "{:.1f} s"))),
    ("", (("peak_memory_mb", "peak {:.0f} MB"),)),
)
_SCORES = ("precision", "recall", "f1")  # per-class columns added by log_final's scores
_CURVES = (("train", "train_{}"), ("val", "val_{}"), ("EMA val", "ema_val_{}"))
WANDB_DEFAULT_URL = "https://api.wandb.ai"
WANDB_PROBE_TIMEOUT_S = 5.0


def wandb_api_key_found(base_url: str) -> bool:
    """Whether wandb will find credentials: WANDB_API_KEY, WANDB_IDENTITY_TOKEN_FILE or a netrc entry
    for the server (what `wandb login` writes)."""
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    host = urlsplit(base_url).hostname or ""
    for path in filter(None, (os.environ.get("NETRC"), Path.home() / ".netrc", Path.home() / "_netrc")):
        try:
            if netrc.netrc(path).authenticators(host):
                return True
        except (OSError, netrc.NetrcParseError):
            continue
    return False


def server_reachable(base_url: str, timeout_s: float = WANDB_PROBE_TIMEOUT_S) -> bool:
    """A TCP connection to the wandb server opens within timeout_s."""
    parts = urlsplit(base_url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        with socket.create_connection((parts.hostname, port), timeout=timeout_s):
            return True
    except (OSError, TypeError):
        return False


def check_wandb(cfg: WandbConfig) -> None:
    """Refuse a wandb mode that cannot work (no package; online without credentials) before anything
    starts; every rank calls it, so all stop together."""
    if cfg.mode == "disabled":
        return
    if importlib.util.find_spec("wandb") is None:
        raise ConfigError(f"logging.wandb.mode={cfg.mode} needs the 'wandb' package: pip install -e .[wandb], "
                          "or set logging.wandb.mode=disabled")
    if cfg.mode != "online":
        return
    base_url = os.environ.get("WANDB_BASE_URL", WANDB_DEFAULT_URL)
    if not wandb_api_key_found(base_url):
        raise ConfigError(f"logging.wandb.mode=online needs a wandb API key for {base_url}: run `wandb login` or "
                          "set WANDB_API_KEY, or use logging.wandb.mode=offline and `wandb sync` the run later")


class RunLogger:
    """Progress, metric files, plots and wandb for one run; every method is a no-op unless enabled."""

    def __init__(self, run_dir: Path, cfg: LoggingConfig, enabled: bool, config_dict: dict,
                 wandb_run_id: str | None = None):
        """enabled: True on rank 0 only. wandb_run_id: the id stored in a checkpoint, to continue its run."""
        self.run_dir = Path(run_dir)
        self.cfg = cfg
        self.enabled = enabled
        self.history: list[dict] = []
        self.wandb_run_id = wandb_run_id
        self._wandb_run = None
        self._bar = None
        self._epoch = 0
        self._num_steps = 0
        # Until the first write, metrics.jsonl may hold lines of an earlier process that are not
        # in the history (a run that died before its first checkpoint): the first write replaces it.
        self._metrics_file_matches_history = False
        self.plot = cfg.plot
        if not enabled:
            return
        self._on_terminal = sys.stderr.isatty()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if cfg.wandb.mode != "disabled":
            self._wandb_run = self._start_wandb(config_dict)

    def _start_wandb(self, config_dict: dict):
        check_wandb(self.cfg.wandb)
        import wandb

        mode = self.cfg.wandb.mode
        base_url = os.environ.get("WANDB_BASE_URL", WANDB_DEFAULT_URL)
        if mode == "online" and not server_reachable(base_url):
            print(f"warning: wandb server {base_url} is not reachable within {WANDB_PROBE_TIMEOUT_S:.0f} s; "
                  "logging offline instead (upload later with `wandb sync`)", flush=True)
            mode = "offline"
        resuming = self.wandb_run_id is not None
        if not resuming:
            # Chosen here rather than by wandb so that the first checkpoint can already store it.
            self.wandb_run_id = "".join(secrets.choice(_WANDB_ID_ALPHABET) for _ in range(_WANDB_ID_LENGTH))
        wandb_cfg = self.cfg.wandb
        run = wandb.init(
            project=wandb_cfg.project,
            entity=wandb_cfg.entity or None,
            name=wandb_cfg.name or None,
            tags=list(wandb_cfg.tags),
            config=config_dict,
            mode=mode,
            dir=str(self.run_dir),
            id=self.wandb_run_id,
            resume="allow" if resuming else None,
            # Never hand back another run that happens to be active in this process.
            reinit="create_new",
            settings=wandb.Settings(silent=True, init_timeout=60),
        )
        if mode == "offline":
            print(f"wandb: offline run {run.id} in {Path(run.dir).parent}; "
                  f"upload it with `wandb sync {Path(run.dir).parent}`", flush=True)
        else:
            print(f"wandb: run {run.id} at {run.url}", flush=True)
        return run

    def start_epoch(self, epoch: int, num_steps: int) -> None:
        """Begin an epoch of num_steps optimizer steps; opens a progress bar on a terminal."""
        if not self.enabled:
            return
        self._epoch, self._num_steps = epoch, num_steps
        if self._on_terminal:
            try:
                from tqdm import tqdm
            except ImportError:  # plain lines instead (the GPU machines may lack tqdm)
                print("note: tqdm is not installed, so progress is printed as lines; pip install tqdm",
                      flush=True)
                self._on_terminal = False
                return
            self._close_bar()
            self._bar = tqdm(total=num_steps, desc=f"epoch {epoch}", file=sys.stderr,
                             dynamic_ncols=True, leave=False)

    def step(self, step_in_epoch: int, global_step: int, loss, lr: float) -> None:
        """Report one optimizer step; step_in_epoch counts from 1.

        On a terminal the bar advances; elsewhere (Slurm logs) a plain line is printed every
        logging.print_every_steps steps. loss: a number or a 0-dim tensor, read only when shown
        (reading a CUDA tensor waits for the device): every step on a terminal's bar, only on the
        printed lines elsewhere.
        """
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.update(step_in_epoch - self._bar.n)
            self._bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.4g}", refresh=False)
            return
        every = self.cfg.print_every_steps
        if not self._on_terminal and every > 0 and step_in_epoch % every == 0:
            print(f"epoch {self._epoch} step {step_in_epoch}/{self._num_steps} "
                  f"loss {loss:.4f} lr {lr:.4g}", flush=True)

    def end_epoch(self, record: dict) -> None:
        """Add one epoch's metrics to the history, the files, the plot and wandb."""
        if not self.enabled:
            return
        self._close_bar()
        record = {key: _plain(value) for key, value in record.items()}
        self.history.append(record)
        print(_summary_line(record), flush=True)
        if self._metrics_file_matches_history:
            with open(self.run_dir / METRICS_FILE, "a") as metrics_file:
                metrics_file.write(json.dumps(record) + "\n")
        else:
            self._write_metrics_file()
        self._write_summary_and_plot()
        if self._wandb_run is not None:
            if "global_step" in record:
                self._wandb_run.log(record, step=int(record["global_step"]))
            else:
                self._wandb_run.log(record)

    def load_history(self, records: list[dict]) -> None:
        """Make the history of a checkpoint the history; later epochs in the files are dropped."""
        if not self.enabled:
            return
        self.history = [{key: _plain(value) for key, value in record.items()} for record in records]
        self._write_metrics_file()
        self._write_summary_and_plot()

    def log_final(self, per_class: dict, confusion: list[list[int]], class_names: list[str],
                  final: dict | None = None, scores: dict | None = None) -> None:
        """Write and print per-class accuracy, the confusion matrix and the final accuracies; log them to wandb.

        per_class: {"model": [accuracy per class], "ema": [...]}; confusion[actual][predicted] counts;
        final: {"model": {"acc": ..., "loss": ...}, "ema_tta2": {...}, ...}; scores: {"model":
        {"precision": [...], "recall": [...], "f1": [...], "support": [...]}, ...} adds those columns.
        """
        if not self.enabled:
            return
        self._close_bar()
        if final:
            atomic_write(self.run_dir / FINAL_FILE, lambda tmp: tmp.write_text(json.dumps(final, indent=2) + "\n"),
                         fsync=False)
            print("final accuracy: " + ", ".join(f"{kind} {r['acc']:.4f}" for kind, r in final.items()), flush=True)
        columns = ["class"] + [f"{name}_acc" for name in per_class]
        rows = [[class_name] + [_plain(per_class[name][index]) for name in per_class]
                for index, class_name in enumerate(class_names)]
        if scores:
            columns += [f"{kind}_{metric}" for kind in scores for metric in _SCORES] + ["support"]
            for index, row in enumerate(rows):
                row += [_plain(scores[kind][metric][index]) for kind in scores for metric in _SCORES]
                row.append(int(next(iter(scores.values()))["support"][index]))
        write_csv(self.run_dir / PER_CLASS_FILE, columns, rows)
        confusion_rows = [[class_name] + [int(count) for count in counts]
                          for class_name, counts in zip(class_names, confusion)]
        write_csv(self.run_dir / CONFUSION_FILE, ["actual/predicted"] + list(class_names), confusion_rows)

        name_width = max(len(name) for name in columns[:1] + list(class_names))
        widths = [max(8, len(column)) for column in columns[1:]]
        print("per-class results" if scores else "per-class accuracy", flush=True)
        print(" ".join([f"{'class':<{name_width}}"] + [f"{c:>{w}}" for c, w in zip(columns[1:], widths)]))
        for row in rows:
            print(" ".join([f"{row[0]:<{name_width}}"] + [f"{v:>{w}}" if isinstance(v, int) else f"{v:>{w}.4f}"
                                                          for v, w in zip(row[1:], widths)]))
        sys.stdout.flush()

        if self._wandb_run is not None:
            import wandb

            long_form = [[actual, predicted, int(confusion[i][j])]
                         for i, actual in enumerate(class_names)
                         for j, predicted in enumerate(class_names)]
            # wandb.plot.confusion_matrix wants every prediction; this is the chart it would build.
            confusion_chart = wandb.plot_table(
                "wandb/confusion_matrix/v1",
                wandb.Table(columns=["Actual", "Predicted", "nPredictions"], data=long_form),
                {"Actual": "Actual", "Predicted": "Predicted", "nPredictions": "nPredictions"},
                {"title": "Confusion matrix"},
            )
            self._wandb_run.log({
                "per_class_accuracy": wandb.Table(columns=columns, data=rows),
                "confusion_matrix": confusion_chart,
                **{f"final/{kind}_acc": r["acc"] for kind, r in (final or {}).items()},
            })

    def close(self) -> None:
        """Close the progress bar, finish the wandb run and wait until wandb has written it."""
        if not self.enabled:
            return
        self._close_bar()
        if self._wandb_run is not None:
            import wandb

            self._wandb_run.finish()
            self._wandb_run = None
            # finish() can return before wandb's service has written the run's .wandb file;
            # teardown waits for it. Its atexit hook would too, but multiprocessing children skip it.
            wandb.teardown()

    def _close_bar(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def _write_metrics_file(self) -> None:
        lines = "".join(json.dumps(record) + "\n" for record in self.history)
        atomic_write(self.run_dir / METRICS_FILE, lambda tmp: tmp.write_text(lines), fsync=False)
        self._metrics_file_matches_history = True

    def _write_summary_and_plot(self) -> None:
        if not self.history:
            (self.run_dir / SUMMARY_FILE).unlink(missing_ok=True)
            (self.run_dir / PLOT_FILE).unlink(missing_ok=True)
            return
        columns = list(dict.fromkeys(key for record in self.history for key in record))
        rows = [[record.get(key, "") for key in columns] for record in self.history]
        write_csv(self.run_dir / SUMMARY_FILE, columns, rows)
        if self.plot:
            try:
                atomic_write(self.run_dir / PLOT_FILE, lambda tmp: _plot_history(self.history, tmp), fsync=False)
            except ImportError:
                print(f"note: matplotlib is not installed, so {PLOT_FILE} is not drawn; pip install matplotlib",
                      flush=True)
                self.plot = False


def _plain(value):
    """A numpy or torch scalar as the Python number it holds; anything else unchanged."""
    item = getattr(value, "item", None)
    return item() if callable(item) else value


def _summary_line(record: dict) -> str:
    """'epoch 3 | train loss 1.2345 acc 0.5512 | val loss ... | lr 0.0812 | 9512 img/s 10.2 s'."""
    groups = [f"epoch {record.get('epoch', '?')}"]
    for label, fields in _SUMMARY_GROUPS:
        values = [template.format(record[key]) for key, template in fields
                  if isinstance(record.get(key), (int, float))]
        if values:
            groups.append(" ".join(([label] if label else []) + values))
    return " | ".join(groups)


def _plot_history(history: list[dict], path: Path) -> None:
    """Loss and accuracy per epoch, train / val / EMA val, side by side."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    # A bare Figure on the Agg canvas: no pyplot, so no global figure state and no display needed.
    figure = Figure(figsize=(12, 4.5))
    FigureCanvasAgg(figure)
    epochs = [record.get("epoch", index + 1) for index, record in enumerate(history)]
    for axis, metric, title in zip(figure.subplots(1, 2), ("loss", "acc"), ("Loss", "Accuracy")):
        for label, key_template in _CURVES:
            key = key_template.format(metric)
            values = [_number_or_nan(record.get(key)) for record in history]
            if not all(math.isnan(value) for value in values):
                axis.plot(epochs, values, marker="o" if len(epochs) < 30 else None, label=label)
        axis.set_title(title)
        axis.set_xlabel("epoch")
        axis.set_ylabel(metric)
        axis.grid(True, alpha=0.3)
        if axis.lines:
            axis.legend()
    figure.tight_layout()
    figure.savefig(path, format="png", dpi=100)


def _number_or_nan(value) -> float:
    return float(value) if isinstance(value, (int, float)) else math.nan
