"""Prediction methods, as class probabilities per image, and their fitting on the val split.

  plain              softmax of the logits
  tta                softmax of the TTA output (`engine.evaluation.tta_output`, by train.tta_average)
  class_specialized  softmax(log p_plain + b): per-class logit offsets b that maximise val accuracy
                     (coordinate ascent over OFFSET_GRID; an offset stays 0 unless it gains images)
  adaptive           p_plain where its top probability ≥ τ, else softmax(log p_tta + b); b fitted on
                     p_tta, then τ on the val split

Fitting sees the val split only, never the test split. Fits are saved beside the checkpoint
(`<checkpoint stem>.fitted.json`) and reused while the checkpoint and the val split are the same.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from cifar_dist.atomic import atomic_write
from cifar_dist.data.cifar import sha256_file

METHODS = ("plain", "tta", "class_specialized", "adaptive")
FITTED_METHODS = ("class_specialized", "adaptive")
OFFSET_GRID = np.round(np.arange(-2.0, 2.0001, 0.05), 2)  # logit offsets tried for each class
THRESHOLD_GRID = np.round(np.arange(0.0, 1.0001, 0.01), 2)  # confidence thresholds τ tried
MAX_ROUNDS = 5  # coordinate-ascent sweeps over the classes; it stops early when a sweep gains nothing


def _log(probs: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore"):
        return np.log(probs.astype(np.float64))


def with_offsets(probs: np.ndarray, offsets) -> np.ndarray:
    """softmax(log probs + offsets): the probabilities with per-class logit offsets added (float64, so
    that zero offsets keep every argmax of float32 probabilities)."""
    scores = _log(probs) + np.asarray(offsets, dtype=np.float64)
    scores -= scores.max(axis=1, keepdims=True)
    weights = np.exp(scores)
    return weights / weights.sum(axis=1, keepdims=True)


def accuracy(probs: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean(probs.argmax(axis=1) == labels))


def fit_offsets(probs: np.ndarray, labels: np.ndarray, grid: np.ndarray = OFFSET_GRID) -> np.ndarray:
    """Per-class logit offsets maximising accuracy: each class in turn gets the grid value that
    classifies most images right with the others fixed (ties: the smallest offset in size)."""
    scores = _log(probs)
    offsets = np.zeros(probs.shape[1])
    by_size = np.argsort(np.abs(grid), kind="stable")
    for _ in range(MAX_ROUNDS):
        improved = False
        for c in range(probs.shape[1]):
            others = scores + offsets
            others[:, c] = -np.inf
            rest_best, rest_class = others.max(axis=1), others.argmax(axis=1)
            wins = scores[:, c, None] + grid[None, :] > rest_best[:, None]  # image → class c, per grid value
            correct = np.where(wins, (labels == c)[:, None], (labels == rest_class)[:, None]).sum(axis=0)
            best = by_size[np.argmax(correct[by_size])]
            current = np.flatnonzero(np.isclose(grid, offsets[c]))[0]
            if correct[best] > correct[current]:
                offsets[c] = grid[best]
                improved = True
        if not improved:
            break
    return offsets


def adaptive(p_plain: np.ndarray, p_fallback: np.ndarray, threshold: float) -> np.ndarray:
    """Per image: p_plain when its top probability is at least threshold, else p_fallback."""
    return np.where(p_plain.max(axis=1, keepdims=True) >= threshold, p_plain, p_fallback)


def fit_threshold(p_plain: np.ndarray, p_fallback: np.ndarray, labels: np.ndarray,
                  grid: np.ndarray = THRESHOLD_GRID) -> float:
    """The τ of `adaptive` maximising accuracy (ties: the smallest, which sends fewest images to TTA)."""
    confident = p_plain.max(axis=1)[:, None] >= grid[None, :]
    correct = np.where(confident, (p_plain.argmax(axis=1) == labels)[:, None],
                       (p_fallback.argmax(axis=1) == labels)[:, None]).sum(axis=0)
    return float(grid[np.argmax(correct)])


@dataclass
class Fit:
    """What a fitted method learnt on the val split, and the val accuracies to show beside plain's."""

    offsets: list
    threshold: float | None
    val_accuracy: dict


def fit(method: str, p_plain: np.ndarray, p_tta: np.ndarray | None, labels: np.ndarray) -> Fit:
    """Fit class_specialized (offsets on p_plain) or adaptive (offsets on p_tta, then τ) on val probabilities."""
    def fit_and_apply(train: np.ndarray, measure: np.ndarray) -> tuple[np.ndarray, float | None, np.ndarray]:
        if method == "class_specialized":
            offsets = fit_offsets(p_plain[train], labels[train])
            return offsets, None, with_offsets(p_plain[measure], offsets)
        offsets = fit_offsets(p_tta[train], labels[train])
        threshold = fit_threshold(p_plain[train], with_offsets(p_tta[train], offsets), labels[train])
        return offsets, threshold, adaptive(p_plain[measure], with_offsets(p_tta[measure], offsets), threshold)

    everything = np.arange(len(labels))
    offsets, threshold, fitted = fit_and_apply(everything, everything)
    # An honest estimate: fitted on one half of the val split, measured on the other, both ways.
    halves = (everything[0::2], everything[1::2])
    right = sum(int((fit_and_apply(a, b)[2].argmax(axis=1) == labels[b]).sum()) for a, b in (halves, halves[::-1]))
    val_accuracy = {"images": len(labels), "plain": accuracy(p_plain, labels)}
    if p_tta is not None:
        val_accuracy["tta"] = accuracy(p_tta, labels)
    val_accuracy.update({method: accuracy(fitted, labels), f"{method}_cross_fitted": right / len(labels)})
    return Fit(offsets.tolist(), threshold, val_accuracy)


def apply_fit(method: str, fitted: Fit, p_plain: np.ndarray, p_tta: np.ndarray | None) -> np.ndarray:
    """The fitted method's probabilities from the plain (and, for adaptive, the TTA) probabilities."""
    if method == "class_specialized":
        return with_offsets(p_plain, fitted.offsets)
    return adaptive(p_plain, with_offsets(p_tta, fitted.offsets), fitted.threshold)


class FitStore:
    """`<checkpoint stem>.fitted.json` beside the checkpoint: fits keyed by method, weights and TTA level,
    valid for one checkpoint (its sha256) and one val split."""

    def __init__(self, checkpoint_path: Path, val_split: dict):
        self.path = checkpoint_path.with_name(f"{checkpoint_path.stem}.fitted.json")
        self.checkpoint_sha256 = sha256_file(checkpoint_path)
        self.val_split = val_split

    def _read(self) -> dict:
        try:
            stored = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}
        return stored.get("fits", {}) if stored.get("checkpoint_sha256") == self.checkpoint_sha256 else {}

    def get(self, key: str, num_classes: int) -> Fit | None:
        """The stored fit, or None when there is none for this checkpoint and split (or it is malformed)."""
        entry = self._read().get(key)
        try:
            if entry["val_split"] != self.val_split or len(entry["offsets"]) != num_classes:
                return None
            return Fit([float(v) for v in entry["offsets"]], entry["threshold"], dict(entry["val_accuracy"]))
        except (KeyError, TypeError, ValueError):
            return None

    def put(self, key: str, fitted: Fit) -> str | None:
        """Save a fit; None, or why it could not be saved (it is then fitted again next time)."""
        fits = {**self._read(), key: {**asdict(fitted), "val_split": self.val_split}}
        text = json.dumps({"checkpoint_sha256": self.checkpoint_sha256, "fits": fits}, indent=2) + "\n"
        try:
            atomic_write(self.path, lambda tmp: tmp.write_text(text), fsync=False)
        except OSError as err:
            return f"could not save {self.path} ({err}); the fit is repeated next time"
        return None
