"""`cifar-dist predict`: labels for a file of images, by one of the methods of `methods`, as `ID,Labels`."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from cifar_dist.outputs import check_writable, write_together
from cifar_dist.cifar10 import CLASS_NAMES
from cifar_dist.engine.distributed import process_group
from cifar_dist.inference.weights import LoadedModel, load_model
from cifar_dist.inference.inputs import read_image_file, write_submission
from cifar_dist.inference.methods import FITTED_METHODS, Fit, FitStore, accuracy, apply_fit, fit
from cifar_dist.inference.scoring import DEFAULT_BATCH_SIZE, Scorer, require_val_split


def check_outputs(out: Path, probs_path: Path | None) -> None:
    """Before any work: the CSV and the .npy can be written."""
    check_writable(out, "--out")
    if probs_path is not None:
        check_writable(probs_path, "--probs")


def write_outputs(out: Path, probs_path: Path | None, ids: list[str], probs: np.ndarray, label_format: str,
                  log=print) -> None:
    """The submission CSV and the probabilities as .npy: both written, or neither."""
    def save_probabilities(tmp: Path) -> None:
        with open(tmp, "wb") as f:  # np.save on a name would append .npy to the temporary name
            np.save(f, probs.astype(np.float32))

    writers = {Path(out): lambda tmp: write_submission(tmp, ids, probs.argmax(axis=1), label_format)}
    if probs_path is not None:
        writers[Path(probs_path)] = save_probabilities
    write_together(writers)
    log(f"wrote {out} ({len(ids)} rows)")
    if probs_path is not None:
        log(f"wrote {probs_path} ({probs.shape[0]} × {probs.shape[1]} float32, rows in the order of {out})")


def _offsets_text(offsets: list) -> str:
    moved = [f"{name} {value:+.2f}" for name, value in zip(CLASS_NAMES, offsets) if value]
    return ", ".join(moved) or "all 0 (no offset gained an image)"


def fitted_method(method: str, scorer: Scorer, loaded: LoadedModel, tta_level, log=print) -> Fit:
    """The method's fit for this checkpoint: reused from its .fitted.json, else fitted on the val split."""
    cfg = loaded.cfg
    require_val_split(cfg, f"--method {method}")
    level = tta_level if method == "adaptive" else 0
    key = f"{method}/{loaded.weights}" + (f"/tta{level}" if method == "adaptive" else "")
    store = FitStore(loaded.path, {"val_fraction": cfg.data.val_fraction, "split_seed": cfg.data.split_seed})
    fitted = store.get(key, cfg.model.num_classes)
    if fitted is not None:
        log(f"{method}: reusing the fit in {store.path}")
    else:
        if loaded.weights == "reference":
            log("note: the val split (data.val_fraction, data.split_seed) may hold images the reference project "
                "trained on; then the fit and its val accuracy are optimistic")
        p_plain, labels = scorer.split("val", 0)
        p_tta = scorer.split("val", level)[0] if method == "adaptive" else None
        fitted = fit(method, p_plain, p_tta, labels)
        problem = store.put(key, fitted) if scorer.env.is_main else None
        log(f"warning: {problem}" if problem else f"{method}: fitted on the val split, saved in {store.path}")
    acc = fitted.val_accuracy
    shown = " · ".join(f"{name} {acc[name]:.4f}" for name in ("plain", "tta") if name in acc)
    log(f"val accuracy ({acc['images']} images): {shown} · {method} {acc[method]:.4f} on the images it was fitted "
        f"on, {acc[f'{method}_cross_fitted']:.4f} cross-fitted (fitted on one half, measured on the other)")
    log(f"{method}: class offsets {_offsets_text(fitted.offsets)}"
        + (f"; plain where confidence ≥ τ = {fitted.threshold:.2f}, else TTA level {level}" if fitted.threshold
           is not None else ""))
    return fitted


def predict(checkpoint: Path, data: Path, method: str, tta_level, out: Path, probs_path: Path | None = None,
            weights: str | None = None, label_format: str = "index", batch_size: int = DEFAULT_BATCH_SIZE,
            overrides: list[str] = (), log=print) -> None:
    """Predict every image of data with the method; rank 0 writes out (and probs_path)."""
    check_outputs(out, probs_path)
    loaded = load_model(checkpoint, weights, overrides)
    image_file = read_image_file(data)
    with process_group(loaded.cfg.train.device) as env:
        log = log if env.is_main else (lambda *a, **k: None)
        log(f"{checkpoint}: {loaded.cfg.model.name}, {loaded.weights} weights, on {env.device}")
        scorer = Scorer(loaded, env, batch_size)
        if method in FITTED_METHODS:
            fitted = fitted_method(method, scorer, loaded, tta_level, log)
            p_tta = scorer.images(image_file.images, tta_level) if method == "adaptive" else None
            probs = apply_fit(method, fitted, scorer.images(image_file.images, 0), p_tta)
        else:
            probs = scorer.images(image_file.images, tta_level if method == "tta" else 0)
        if not env.is_main:
            return
        if image_file.labels is not None:
            log(f"accuracy on {data} (its labels): {accuracy(probs, image_file.labels):.4f}")
        write_outputs(out, probs_path, image_file.ids, probs, label_format, log)
