"""`cifar-dist evaluate`: a checkpoint on a split, with per-class and calibration reports.

Runs on one process or under torchrun (each rank scores a contiguous shard; rank 0 gathers every
image once and writes). Writes to the output folder:
  results.json               accuracy, loss, expected calibration error and its bins, per-class scores
  classification_report.md   precision / recall / F1 / support per class, accuracy, averages
  per_class.csv              the same per class
  confusion_matrix.csv/.png  rows: true class, columns: predicted class
  reliability_diagram.png    accuracy against confidence per bin
  predictions.csv            per image of the split (in split order): label, prediction, confidence
With TTA, probabilities are averaged over the views (softmax, then the weighted mean).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from cifar_dist import metrics, plots, run_files
from cifar_dist.atomic import atomic_write, write_csv
from cifar_dist.cifar10 import CLASS_NAMES
from cifar_dist.engine.distributed import process_group
from cifar_dist.engine.evaluation import NLL_FLOOR
from cifar_dist.inference.scoring import DEFAULT_BATCH_SIZE, Scorer, require_val_split
from cifar_dist.inference.weights import load_model
from cifar_dist.outputs import check_writable


def summarize(probs: np.ndarray, labels: np.ndarray) -> dict:
    """Accuracy, loss, calibration and per-class scores of per-image probabilities."""
    num_classes = probs.shape[1]
    predictions = probs.argmax(axis=1)
    confusion = metrics.confusion_matrix(labels, predictions, num_classes)
    scores = metrics.per_class_scores(confusion)
    true_class = np.maximum(probs[np.arange(len(labels)), labels], NLL_FLOOR)
    return {
        "images": len(labels),
        "accuracy": float(np.mean(predictions == labels)),
        "loss": float(-np.mean(np.log(true_class.astype(np.float64)))),
        "calibration": metrics.calibration(probs, labels),
        "per_class": {name: {key: scores[key][index] for key in scores} for index, name in enumerate(CLASS_NAMES)},
        "averages": metrics.averages(scores),
        "confusion": confusion.tolist(),
    }


def write_report(out_dir: Path, results: dict, probs: np.ndarray, labels: np.ndarray, log=print) -> None:
    """The files of the module docstring; each is written whole or not at all."""
    out_dir.mkdir(parents=True, exist_ok=True)
    confusion = results["confusion"]
    run_files.write_json(out_dir / "results.json", results)
    report = metrics.report_markdown(confusion, CLASS_NAMES)
    atomic_write(out_dir / "classification_report.md", lambda tmp: tmp.write_text(report), fsync=False)
    run_files.write_per_class(out_dir / run_files.PER_CLASS, CLASS_NAMES,
                              {results["weights"]: metrics.per_class_scores(confusion)})
    run_files.write_confusion(out_dir / run_files.CONFUSION, CLASS_NAMES, confusion)
    write_csv(out_dir / "predictions.csv", ["index", "label", "prediction", "confidence"],
               zip(range(len(labels)), labels.tolist(), probs.argmax(axis=1).tolist(),
                   np.round(probs.max(axis=1).astype(np.float64), 6).tolist()))
    title = f"{results['checkpoint']} ({results['weights']}, {results['split']}, TTA {results['tta']})"
    try:
        plots.plot_confusion(confusion, CLASS_NAMES, out_dir / "confusion_matrix.png", title)
        calibration = results["calibration"]
        plots.plot_reliability(calibration["bins"], calibration["ece"], out_dir / "reliability_diagram.png", title)
    except ImportError:
        log("note: matplotlib is not installed, so the PNG figures are not drawn; pip install matplotlib")
    log(report.rstrip("\n"))


def evaluate_checkpoint(checkpoint: Path, split: str = "val", tta_level=0, out_dir: Path | None = None,
             weights: str | None = None, batch_size: int = DEFAULT_BATCH_SIZE, overrides: list[str] = (),
             log=print) -> dict | None:
    """Evaluate on every rank; rank 0 writes the report and returns the results (None elsewhere)."""
    if out_dir:
        check_writable(out_dir, "--out", folder=True)
    loaded = load_model(checkpoint, weights, overrides)
    if split == "val":
        require_val_split(loaded.cfg, "evaluate --split val")
    checkpoint = Path(checkpoint)
    out_dir = Path(out_dir) if out_dir else \
        checkpoint.parent / f"eval-{checkpoint.stem}-{loaded.weights}-{split}-tta{tta_level}"
    check_writable(out_dir, "the report folder", folder=True)
    with process_group(loaded.cfg.train.device) as env:
        probs, labels = Scorer(loaded, env, batch_size).split(split, tta_level)
        if not env.is_main:
            return None
    results = {"checkpoint": str(checkpoint), "weights": loaded.weights, "split": split, "tta": tta_level,
               "world_size": env.world_size, **summarize(probs, labels)}
    log(f"{checkpoint} ({loaded.weights} weights) on {split}, TTA {tta_level}, {env.world_size} process(es): "
        f"accuracy {results['accuracy']:.4f}, loss {results['loss']:.4f}, expected calibration error "
        f"{results['calibration']['ece']:.4f} over {results['images']} images")
    write_report(out_dir, results, probs, labels, log)
    log(f"wrote {out_dir}")
    return results
