"""Classification metrics from a confusion matrix or from per-image probabilities.

Per class: precision, recall, F1 and support, with sklearn's conventions (a class never
predicted has precision 0; the averages are macro and support-weighted). Calibration: the
expected calibration error over equal-width confidence bins (Guo et al. 2017).
"""
from __future__ import annotations

import numpy as np

CALIBRATION_BINS = 15  # equal-width confidence bins, as in Guo et al. (2017)


def per_class_scores(confusion) -> dict[str, list]:
    """{"precision", "recall", "f1", "support"}: one value per class; confusion[true][predicted] counts."""
    counts = np.asarray(confusion, dtype=np.int64)
    true_positives = np.diag(counts).astype(np.float64)
    support, predicted = counts.sum(axis=1), counts.sum(axis=0)
    precision = np.divide(true_positives, predicted, out=np.zeros_like(true_positives), where=predicted > 0)
    recall = np.divide(true_positives, support, out=np.zeros_like(true_positives), where=support > 0)
    both = precision + recall
    f1 = np.divide(2 * precision * recall, both, out=np.zeros_like(both), where=both > 0)
    return {"precision": precision.tolist(), "recall": recall.tolist(), "f1": f1.tolist(),
            "support": support.tolist()}


def averages(scores: dict[str, list]) -> dict[str, dict]:
    """Macro and support-weighted averages of precision, recall and F1."""
    support = np.asarray(scores["support"], dtype=np.float64)
    total = int(support.sum())
    result = {}
    for name, weights in (("macro avg", np.ones_like(support)), ("weighted avg", support)):
        result[name] = {metric: float(np.average(scores[metric], weights=weights)) if weights.sum() else 0.0
                        for metric in ("precision", "recall", "f1")}
        result[name]["support"] = total
    return result


def confusion_matrix(labels, predictions, num_classes: int):
    """counts[true][predicted] of numpy arrays, or of torch tensors on their device (the trainer counts there)."""
    flat = labels * num_classes + predictions
    counts = flat.bincount(minlength=num_classes ** 2) if hasattr(flat, "bincount") else \
        np.bincount(flat, minlength=num_classes ** 2)
    return counts.reshape(num_classes, num_classes)


def report_markdown(confusion, class_names) -> str:
    """A markdown table of precision, recall, F1 and support per class, accuracy and the averages."""
    scores = per_class_scores(confusion)
    counts = np.asarray(confusion)
    total = int(counts.sum())
    lines = ["| class | precision | recall | f1-score | support |", "| --- | ---: | ---: | ---: | ---: |"]
    for index, name in enumerate(class_names):
        lines.append(f"| {name} | {scores['precision'][index]:.4f} | {scores['recall'][index]:.4f} | "
                     f"{scores['f1'][index]:.4f} | {scores['support'][index]} |")
    lines.append(f"| accuracy | | | {np.trace(counts) / max(total, 1):.4f} | {total} |")
    for name, row in averages(scores).items():
        lines.append(f"| {name} | {row['precision']:.4f} | {row['recall']:.4f} | {row['f1']:.4f} | {row['support']} |")
    return "\n".join(lines) + "\n"


def calibration(probabilities: np.ndarray, labels: np.ndarray, num_bins: int = CALIBRATION_BINS) -> dict:
    """Expected calibration error and its bins: Σ_b (n_b / N) · |accuracy_b − mean confidence_b|.

    Bin b holds the images whose top probability lies in (b/num_bins, (b+1)/num_bins] (0 in bin 0).
    """
    confidence = probabilities.max(axis=1).astype(np.float64)
    correct = (probabilities.argmax(axis=1) == labels).astype(np.float64)
    bins = np.clip(np.ceil(confidence * num_bins).astype(np.int64) - 1, 0, num_bins - 1)
    count = np.bincount(bins, minlength=num_bins)
    confidence_sum = np.bincount(bins, weights=confidence, minlength=num_bins)
    correct_sum = np.bincount(bins, weights=correct, minlength=num_bins)
    filled = count > 0
    mean_confidence = np.divide(confidence_sum, count, out=np.zeros(num_bins), where=filled)
    accuracy = np.divide(correct_sum, count, out=np.zeros(num_bins), where=filled)
    ece = float(np.sum(count * np.abs(accuracy - mean_confidence)) / max(len(labels), 1))
    return {"ece": ece, "bins": [{"upper": (b + 1) / num_bins, "count": int(count[b]),
                                  "confidence": float(mean_confidence[b]), "accuracy": float(accuracy[b])}
                                 for b in range(num_bins)]}
