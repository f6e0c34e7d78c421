"""Every figure the package draws, as PNG: training history, confusion matrix, reliability diagram, and
the benchmarks' charts through `draw_png`. matplotlib is imported on use (ImportError when missing: the
callers say so and go on); figures are bare `Figure`s on the Agg canvas, so no pyplot state and no display.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Callable

import numpy as np

from cifar_dist.atomic import atomic_write

HISTORY_CURVES = (("train", "train_{}"), ("val", "val_{}"), ("EMA val", "ema_val_{}"))


def _figure(size: tuple[float, float]):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=size)
    FigureCanvasAgg(figure)
    return figure


def draw_png(draw: Callable, path: Path, size: tuple[float, float] = (9, 5)) -> None:
    """draw(figure) on a new figure, saved whole or not at all to path."""
    figure = _figure(size)
    draw(figure)
    figure.tight_layout()
    atomic_write(path, lambda tmp: figure.savefig(tmp, format="png", dpi=100), fsync=False)


def plot_history(history: list[dict], path: Path) -> None:
    """Loss and accuracy per epoch, train / val / EMA val, side by side."""
    def draw(figure) -> None:
        epochs = [record.get("epoch", index + 1) for index, record in enumerate(history)]
        for axis, metric, title in zip(figure.subplots(1, 2), ("loss", "acc"), ("Loss", "Accuracy")):
            for label, key_template in HISTORY_CURVES:
                values = [_number_or_nan(record.get(key_template.format(metric))) for record in history]
                if not all(math.isnan(value) for value in values):
                    axis.plot(epochs, values, marker="o" if len(epochs) < 30 else None, label=label)
            axis.set_title(title)
            axis.set_xlabel("epoch")
            axis.set_ylabel(metric)
            axis.grid(True, alpha=0.3)
            if axis.lines:
                axis.legend()

    draw_png(draw, path, size=(12, 4.5))


def _number_or_nan(value) -> float:
    return float(value) if isinstance(value, (int, float)) else math.nan


def plot_confusion(confusion, class_names, path: Path, title: str) -> None:
    """Counts per (true, predicted) class, shaded by the share of the true class."""
    counts = np.asarray(confusion)
    shares = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)

    def draw(figure) -> None:
        axis = figure.subplots()
        image = axis.imshow(shares, cmap="Blues", vmin=0, vmax=1)
        figure.colorbar(image, ax=axis, label="share of the true class")
        ticks = range(len(class_names))
        axis.set_xticks(ticks, class_names, rotation=45, ha="right")
        axis.set_yticks(ticks, class_names)
        for row in ticks:
            for column in ticks:
                axis.text(column, row, str(counts[row, column]), ha="center", va="center", fontsize=7,
                          color="white" if shares[row, column] > 0.5 else "black")
        axis.set_xlabel("predicted")
        axis.set_ylabel("true")
        axis.set_title(title)

    draw_png(draw, path, size=(8, 7))


def plot_reliability(bins: list[dict], ece: float, path: Path, title: str) -> None:
    """Accuracy against mean confidence per bin, with the diagonal of perfect calibration."""
    def draw(figure) -> None:
        axis = figure.subplots()
        width = 1 / len(bins)
        lefts = [b["upper"] - width for b in bins]
        axis.bar(lefts, [b["accuracy"] for b in bins], width=width, align="edge", edgecolor="black",
                 label="accuracy")
        axis.bar(lefts, [b["confidence"] - b["accuracy"] if b["count"] else 0 for b in bins], width=width,
                 bottom=[b["accuracy"] for b in bins], align="edge", color="red", alpha=0.3, label="gap to confidence")
        axis.plot([0, 1], [0, 1], "k--", label="perfect calibration")
        axis.set_xlim(0, 1)
        axis.set_ylim(0, 1)
        axis.set_xlabel("confidence (top probability)")
        axis.set_ylabel("accuracy")
        axis.set_title(f"{title}\nexpected calibration error {ece:.4f}")
        axis.legend(loc="upper left")

    draw_png(draw, path, size=(6, 6))
