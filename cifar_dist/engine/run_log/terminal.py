"""The terminal: a tqdm bar per epoch on a terminal, plain progress lines with the epoch's and the run's ETA
elsewhere (Slurm logs), the whole run's estimate once its first steps are timed, the one-line epoch summary
and the final tables."""
from __future__ import annotations

import math
import sys

from cifar_dist.engine.run_log import LogSink, RunLength
from cifar_dist.engine.run_log.pace import Pace, duration_words
from cifar_dist.run_files import per_class_rows

ESTIMATE_AFTER_STEPS = 5  # timed steps (after the warm-up) before the whole run's estimate is printed
LONG_RUN_S = 24 * 3600  # an estimate above this suggests the speed recipe
FAST_RECIPE = "./launch/train --config configs/fast.yaml"

# Groups of the one-line epoch summary: a label, then (record key, format) pairs; absent keys are skipped.
SUMMARY_GROUPS = (
    ("train", (("train_loss", "loss {:.4f}"), ("train_acc", "acc {:.4f}"))),
    ("val", (("val_loss", "loss {:.4f}"), ("val_acc", "acc {:.4f}"))),
    ("ema val", (("ema_val_loss", "loss {:.4f}"), ("ema_val_acc", "acc {:.4f}"))),
    ("", (("lr", "lr {:.4g}"),)),
    ("", (("images_per_s", "{:.0f} img/s"), ("epoch_s", "{:.1f} s"))),
    ("", (("peak_memory_mb", "peak {:.0f} MB"),)),
    ("", (("tflops", "{:.3g} TFLOPS"), ("mfu", "MFU {:.1%}"))),
)


class Terminal(LogSink):
    def __init__(self, print_every_steps: int, length: RunLength | None = None):
        """length: for the whole run's ETA and estimate (without it, the epoch's ETA only)."""
        self.print_every_steps = print_every_steps
        self.on_terminal = sys.stderr.isatty()
        self.bar = None
        self.epoch = self.num_steps = 0
        self.length, self.pace = length, Pace()
        self.first_step = None  # the global step of this launch's first step
        self.estimated = False

    def start_epoch(self, epoch: int, num_steps: int) -> None:
        self.epoch, self.num_steps = epoch, num_steps
        self.pace.start_epoch()
        if not self.on_terminal:
            return
        try:
            from tqdm import tqdm
        except ImportError:  # plain lines instead (the GPU machines may lack tqdm)
            print("note: tqdm is not installed, so progress is printed as lines; pip install tqdm", flush=True)
            self.on_terminal = False
            return
        self._close_bar()
        self.bar = tqdm(total=num_steps, desc=f"epoch {epoch}", file=sys.stderr, dynamic_ncols=True, leave=False)

    def step(self, step_in_epoch: int, global_step: int, loss, lr: float) -> None:
        """The bar advances every step; a plain line every logging.print_every_steps steps (the loss is read
        only then), with the ETAs once steps are timed."""
        self.pace.step()
        if self.first_step is None:
            self.first_step = global_step
        timed = self.pace.timed_steps >= ESTIMATE_AFTER_STEPS and self.pace.seconds_per_step
        if self.length and timed and not self.estimated:
            self._print_estimate(global_step)
        if self.bar is not None:
            self.bar.update(step_in_epoch - self.bar.n)
            self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.4g}", refresh=False)
            return
        every = self.print_every_steps
        if not self.on_terminal and every > 0 and step_in_epoch % every == 0:
            print(f"epoch {self.epoch} step {step_in_epoch}/{self.num_steps} loss {loss:.4f} lr {lr:.4g}"
                  f"{self._etas(step_in_epoch, global_step)}", flush=True)

    def _etas(self, step_in_epoch: int, global_step: int) -> str:
        """' | epoch ETA 12 s | run ETA 3 h 20 min', or '' before any step is timed."""
        epoch_s = self.pace.eta_s(self.num_steps - step_in_epoch)
        if epoch_s is None:
            return ""
        run_s = self._run_eta_s(global_step)
        return f" | epoch ETA {duration_words(epoch_s)}" + (f" | run ETA {duration_words(run_s)}" if run_s else "")

    def _run_eta_s(self, global_step: int) -> float | None:
        """The steps left and the epoch ends left (this epoch's included) at the pace so far."""
        if not self.length:
            return None
        length = self.length
        epoch_ends_left = max(0, math.ceil(length.stop_step / length.steps_per_epoch) - self.epoch + 1)
        return self.pace.eta_s(max(0, length.stop_step - global_step), epoch_ends_left)

    def _print_estimate(self, global_step: int) -> None:
        """Once: how long the whole run will take, and the speed recipe when that is more than a day."""
        self.estimated = True
        length = self.length
        seconds = self._run_eta_s(global_step)
        images_per_s = length.images_per_step / self.pace.seconds_per_step
        epochs = length.stop_step / length.steps_per_epoch
        left = (f"{epochs:g} epoch{'' if epochs == 1 else 's'}" if self.first_step == 1 else
                f"the {(length.stop_step - global_step) / length.steps_per_epoch:.1f} epochs left of {epochs:g}")
        print(f"estimate: about {duration_words(seconds)} for {left} at {images_per_s:,.0f} images/s "
              "(training steps; each epoch's evaluation adds to it)", flush=True)
        if seconds > LONG_RUN_S:
            print(f"note: that is more than a day on this machine. configs/fast.yaml is airbench94's recipe, 9.9 "
                  f"epochs of a small net: {FAST_RECIPE}", flush=True)

    def end_epoch(self, record: dict, history: list[dict]) -> None:
        self._close_bar()
        print(summary_line(record), flush=True)

    def final(self, final: dict, scores: dict[str, dict], confusion, class_names) -> None:
        self._close_bar()
        if final:
            print("final accuracy: " + ", ".join(f"{kind} {r['acc']:.4f}" for kind, r in final.items()), flush=True)
        columns, rows = per_class_rows(class_names, scores)
        name_width = max(len(name) for name in ["class", *class_names])
        widths = [max(8, len(column)) for column in columns[1:]]
        print("per-class results", flush=True)
        print(" ".join([f"{'class':<{name_width}}"] + [f"{c:>{w}}" for c, w in zip(columns[1:], widths)]))
        for row in rows:
            print(" ".join([f"{row[0]:<{name_width}}"] + [f"{v:>{w}}" if isinstance(v, int) else f"{v:>{w}.4f}"
                                                          for v, w in zip(row[1:], widths)]))
        sys.stdout.flush()

    def close(self) -> None:
        self._close_bar()

    def _close_bar(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def summary_line(record: dict) -> str:
    """'epoch 3 | train loss 1.2345 acc 0.5512 | val loss ... | lr 0.0812 | 9512 img/s 10.2 s'."""
    groups = [f"epoch {record.get('epoch', '?')}"]
    for label, fields in SUMMARY_GROUPS:
        values = [template.format(record[key]) for key, template in fields
                  if isinstance(record.get(key), (int, float))]
        if values:
            groups.append(" ".join(([label] if label else []) + values))
    return " | ".join(groups)
