"""The files prediction reads and writes: images to classify, and `ID,Labels` submission CSVs.

Images: the official test batch (a pickle with `data` and `labels`), a competition test pickle
(`data` as (N, 3072) rows or (N, 32, 32, 3), `ids`; str or bytes keys) or an `.npz` (`x_test` or
`images`, optional `ids` and `y_test`/`labels`). Ids must be unique; without them, 0..N-1.
"""
from __future__ import annotations

import csv
import io
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cifar_dist.atomic import write_csv
from cifar_dist.data.cifar import read_image_pickle, rows_to_nhwc
from cifar_dist.cifar10 import CLASS_NAMES, NUM_CLASSES
from cifar_dist.errors import DataError

SUBMISSION_HEADER = ["ID", "Labels"]
LABEL_FORMATS = ("index", "name")


@dataclass
class ImageFile:
    images: np.ndarray  # (N, 32, 32, 3) uint8
    ids: list[str]
    labels: np.ndarray | None  # int64 class indices, when the file has them


def _first(npz, keys: tuple[str, ...]):
    return next((npz[key] for key in keys if key in npz.files), None)


def _read_npz(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    try:
        with np.load(path, allow_pickle=False) as npz:
            images, ids, labels = _first(npz, ("x_test", "images")), _first(npz, ("ids",)), \
                _first(npz, ("y_test", "labels"))
            names = npz.files
    except (OSError, ValueError, EOFError) as err:
        raise DataError(f"{path}: cannot read the .npz ({' '.join(str(err).split())})") from None
    if images is None:
        raise DataError(f"{path}: missing array 'x_test' or 'images' (found {', '.join(names) or 'none'})")
    if images.ndim == 2:
        images = rows_to_nhwc(images, str(path))
    if images.ndim != 4 or images.shape[1:] != (32, 32, 3):
        raise DataError(f"{path}: expected images of shape (N, 32, 32, 3) or (N, 3072), found {images.shape}")
    if images.dtype != np.uint8:
        raise DataError(f"{path}: expected uint8 pixels, found {images.dtype}")
    ids = np.arange(len(images)) if ids is None else ids
    if len(ids) != len(images):
        raise DataError(f"{path}: {len(ids)} ids for {len(images)} images")
    if labels is not None:
        labels = labels.reshape(-1)
        if len(labels) != len(images):
            raise DataError(f"{path}: expected {len(images)} labels, found {len(labels)}")
    return images, ids, labels


def _id_text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def read_image_file(path: str | Path) -> ImageFile:
    """Images, ids and (when present) labels from a test pickle or an .npz; DataError when malformed."""
    path = Path(path)
    if path.is_dir():
        raise DataError(f"{path} is a folder; expected a test pickle (test_batch, cifar_test.pkl) or an .npz file")
    if not path.is_file():
        raise DataError(f"{path}: no such file; expected a test pickle (test_batch, cifar_test.pkl) or an .npz")
    images, ids, labels = _read_npz(path) if path.suffix == ".npz" else read_image_pickle(path)
    if len(images) == 0:
        raise DataError(f"{path}: holds no images")
    id_texts = [_id_text(value) for value in ids.tolist()]
    duplicates = [text for text, count in Counter(id_texts).items() if count > 1]
    if duplicates:
        raise DataError(f"{path}: ids are not unique ({duplicates[0]!r} appears more than once)")
    if labels is not None:
        if not np.issubdtype(labels.dtype, np.integer) or labels.min() < 0 or labels.max() >= NUM_CLASSES:
            raise DataError(f"{path}: labels must be integers in 0..{NUM_CLASSES - 1}")
        labels = labels.astype(np.int64)
    return ImageFile(images, id_texts, labels)


def write_submission(path: str | Path, ids: list[str], predictions: np.ndarray, label_format: str = "index") -> None:
    """`ID,Labels` rows in the order of ids; labels as class indices or class names."""
    labels = [CLASS_NAMES[p] if label_format == "name" else str(int(p)) for p in predictions]
    write_csv(path, SUBMISSION_HEADER, zip(ids, labels))


def _class_index(label: str) -> int | None:
    if label.isdigit() and int(label) < NUM_CLASSES:
        return int(label)
    return CLASS_NAMES.index(label) if label in CLASS_NAMES else None


def read_submission(path: str | Path) -> tuple[list[str], np.ndarray]:
    """(ids, class indices) of an `ID,Labels` CSV whose labels are class indices or class names."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file; expected a submission CSV with the header ID,Labels")
    try:
        rows = list(csv.reader(io.StringIO(path.read_text())))
    except (UnicodeDecodeError, csv.Error) as err:
        raise DataError(f"{path}: not a CSV file ({err})") from None
    if not rows or rows[0] != SUBMISSION_HEADER:
        found = ",".join(rows[0]) if rows else "an empty file"
        raise DataError(f"{path}: expected the header ID,Labels, found {found}")
    ids, labels = [], []
    for line, row in enumerate(rows[1:], start=2):
        index = _class_index(row[1].strip()) if len(row) == 2 else None
        if index is None:
            raise DataError(f"{path}, line {line}: expected 'id,label' with a label in 0..{NUM_CLASSES - 1} or a "
                            f"class name, found {','.join(row)!r}")
        ids.append(row[0])
        labels.append(index)
    if not ids:
        raise DataError(f"{path}: holds no rows")
    return ids, np.asarray(labels, dtype=np.int64)
