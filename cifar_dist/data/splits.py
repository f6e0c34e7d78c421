"""The seeded, stratified train/val split that every loader and the beton writer share."""
from __future__ import annotations

import numpy as np

from cifar_dist.config import DataConfig
from cifar_dist.data.cifar import CifarArrays, load_cifar10

SPLITS = ("train", "val", "test")


def stratified_split(labels: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, val), each sorted; every class gives round(val_fraction * count) to val."""
    rng = np.random.default_rng(seed)
    val_parts = []
    for cls in np.unique(labels):
        members = np.flatnonzero(labels == cls)
        n_val = int(round(val_fraction * len(members)))
        val_parts.append(rng.permutation(members)[:n_val])
    val = np.sort(np.concatenate(val_parts)) if val_parts else np.empty(0, dtype=np.int64)
    train = np.setdiff1d(np.arange(len(labels)), val)
    return train, val


def split_arrays(arrays: CifarArrays, val_fraction: float, seed: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{'train'|'val'|'test': (NHWC uint8 images, int64 labels)}."""
    train_idx, val_idx = stratified_split(arrays.y_train, val_fraction, seed)
    return {
        "train": (arrays.x_train[train_idx], arrays.y_train[train_idx]),
        "val": (arrays.x_train[val_idx], arrays.y_train[val_idx]),
        "test": (arrays.x_test, arrays.y_test),
    }


def load_split(cfg: DataConfig, split: str) -> tuple[np.ndarray, np.ndarray]:
    """One split read from the raw files (the path of the loaders that need no beton)."""
    arrays = load_cifar10(cfg.root, cfg.download, cfg.npz_name, cfg.require_full_size)
    images, labels = split_arrays(arrays, cfg.val_fraction, cfg.split_seed)[split]
    if split == "train" and cfg.train_subset:
        images, labels = images[: cfg.train_subset], labels[: cfg.train_subset]
    return images, labels
