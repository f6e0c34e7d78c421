"""The terminal: a tqdm bar per epoch on a terminal, plain progress lines elsewhere (Slurm logs), the
one-line epoch summary and the final tables."""
from __future__ import annotations

import sys

from cifar_dist.engine.run_log import LogSink
from cifar_dist.run_files import per_class_rows

# Groups of the one-line epoch summary: a label, then (record key, format) pairs; absent keys are skipped.
SUMMARY_GROUPS = (
    ("train", (("train_loss", "loss {:.4f}"), ("train_acc", "acc {:.4f}"))),
    ("val", (("val_loss", "loss {:.4f}"), ("val_acc", "acc {:.4f}"))),
    ("ema val", (("ema_val_loss", "loss {:.4f}"), ("ema_val_acc", "acc {:.4f}"))),
    ("", (("lr", "lr {:.4g}"),)),
    ("", (("images_per_s", "{:.0f} img/s"), ("epoch_s", "{:.1f} s"))),
    ("", (("peak_memory_mb", "peak {:.0f} MB"),)),
)


class Terminal(LogSink):
    def __init__(self, print_every_steps: int):
        self.print_every_steps = print_every_steps
        self.on_terminal = sys.stderr.isatty()
        self.bar = None
        self.epoch = self.num_steps = 0

    def start_epoch(self, epoch: int, num_steps: int) -> None:
        self.epoch, self.num_steps = epoch, num_steps
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
        only then)."""
        if self.bar is not None:
            self.bar.update(step_in_epoch - self.bar.n)
            self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.4g}", refresh=False)
            return
        every = self.print_every_steps
        if not self.on_terminal and every > 0 and step_in_epoch % every == 0:
            print(f"epoch {self.epoch} step {step_in_epoch}/{self.num_steps} loss {loss:.4f} lr {lr:.4g}", flush=True)

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
