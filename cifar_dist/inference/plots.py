"""The evaluation figures: confusion matrix and reliability diagram (PNG; matplotlib imported on use)."""
from __future__ import annotations

from pathlib import Path

import numpy as np


def _figure(size: tuple[float, float]):
    # A bare Figure on the Agg canvas: no pyplot, so no global figure state and no display needed.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=size)
    FigureCanvasAgg(figure)
    return figure


def plot_confusion(confusion, class_names, path: Path, title: str) -> None:
    """Counts per (true, predicted) class, shaded by the share of the true class."""
    counts = np.asarray(confusion)
    shares = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    figure = _figure((8, 7))
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
    figure.tight_layout()
    figure.savefig(path, format="png", dpi=100)


def plot_reliability(bins: list[dict], ece: float, path: Path, title: str) -> None:
    """Accuracy against mean confidence per bin, with the diagonal of perfect calibration."""
    figure = _figure((6, 6))
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
    figure.tight_layout()
    figure.savefig(path, format="png", dpi=100)
