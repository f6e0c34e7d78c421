"""Readers for CIFAR-10 in its common forms, with validation and an optional download.

All readers return `CifarArrays`: NHWC uint8 images and int64 labels for train and test. Pickles
are read by an unpickler that builds dicts, lists and numpy arrays and refuses any other call, so a
file from elsewhere runs no code; .npz files are read without pickles.
"""
from __future__ import annotations

import hashlib
import io
import pickle
import tarfile
import tempfile
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

try:
    from numpy._core import multiarray, numeric
except ImportError:  # numpy < 2
    from numpy.core import multiarray, numeric

from cifar_dist.cifar10 import NUM_CLASSES
from cifar_dist.errors import DataError

TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_BATCH = "test_batch"
FOLDER_NAME = "cifar-10-batches-py"
ARCHIVE_NAME = "cifar-10-python.tar.gz"
ARCHIVE_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
ARCHIVE_MD5 = "c58f30108f718f92721af3b95e74349a"
EXPECTED_COUNTS = {"train": 50_000, "test": 10_000}


@dataclass
class CifarArrays:
    x_train: np.ndarray  # (50000, 32, 32, 3) uint8
    y_train: np.ndarray  # (50000,) int64
    x_test: np.ndarray
    y_test: np.ndarray
    source: str = ""
    checksums: dict = field(default_factory=dict)  # file name -> sha256 of the source files


def sha256_file(path: Path, chunk_bytes: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def rows_to_nhwc(rows: np.ndarray, source: str) -> np.ndarray:
    """(N, 3072) channel-major rows (1024 R, 1024 G, 1024 B) → (N, 32, 32, 3)."""
    if rows.ndim != 2 or rows.shape[1] != 3072:
        raise DataError(f"{source}: expected image rows of shape (N, 3072), found {rows.shape}")
    return np.ascontiguousarray(rows.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))


def _get(batch: dict, key: str):
    """Python 2 pickles give str or bytes keys depending on the encoding used to load them."""
    if key in batch:
        return batch[key]
    if key.encode() in batch:
        return batch[key.encode()]
    raise KeyError(key)


class _Refused(pickle.UnpicklingError):
    """A pickle naming a call it may not make; the message is the call."""


def _latin1_bytes(text: str, encoding: str) -> bytes:
    """How protocol 2 pickles bytes (`_codecs.encode(text, 'latin1')`), for that codec alone."""
    if encoding not in ("latin1", "latin-1"):
        raise _Refused(f"_codecs.encode(..., {encoding!r})")
    return text.encode("latin1")


def _empty_bytes() -> bytes:
    """How protocol 2 pickles b'' (`bytes()`), without bytes(n)'s allocation."""
    return b""


# What a CIFAR-10 pickle may name: numpy rebuilding its arrays, dtypes and scalars (under numpy 1's and
# 2's module names, as Python 2, numpy 1.x and numpy 2 wrote them with protocols 0 to 5) and bytes as
# protocol 2 writes them. Rebuilding these fills arrays from bytes; none runs other code.
PICKLE_GLOBALS = {
    **{(module, name): getattr(multiarray, name)
       for module in ("numpy.core.multiarray", "numpy._core.multiarray") for name in ("_reconstruct", "scalar")},
    **{(module, "_frombuffer"): numeric._frombuffer for module in ("numpy.core.numeric", "numpy._core.numeric")},
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): _latin1_bytes,
    ("__builtin__", "bytes"): _empty_bytes,  # b"" in protocols 0 to 2 (Python 2 spelling)
    ("builtins", "bytes"): _empty_bytes,
}


class _ArraysOnlyUnpickler(pickle.Unpickler):
    """Unpickles dicts, lists, strings, numbers and numpy arrays; any other global is _Refused."""

    def find_class(self, module: str, name: str):
        if (module, name) in PICKLE_GLOBALS:
            return PICKLE_GLOBALS[module, name]
        raise _Refused(f"{module}.{name}")


def load_pickle_bytes(raw: bytes, source: str) -> dict:
    """A pickled dict of arrays, read without running code (`_ArraysOnlyUnpickler`); DataError if not."""
    try:
        batch = _ArraysOnlyUnpickler(io.BytesIO(raw), encoding="latin1").load()
    except _Refused as err:
        raise DataError(f"{source}: holds a `{err}` call, which loading would run: refused; a CIFAR-10 pickle holds "
                        "only dicts, lists, strings, numbers and numpy arrays: replace the file with the official "
                        "data (or write yours with those alone)") from None
    except Exception as err:  # truncated or not a pickle at all
        raise DataError(f"{source}: cannot be read as a CIFAR-10 pickle ({type(err).__name__}: {err}); "
                        "the file is truncated or corrupted: replace it with a fresh copy") from None
    if not isinstance(batch, dict):
        raise DataError(f"{source}: expected a pickled dict, found {type(batch).__name__}")
    return batch


def parse_batch(raw: bytes, source: str) -> tuple[np.ndarray, np.ndarray]:
    batch = load_pickle_bytes(raw, source)
    try:
        data, labels = _get(batch, "data"), _get(batch, "labels")
    except KeyError as err:
        raise DataError(f"{source}: missing key {err} (expected 'data' and 'labels')") from None
    images = rows_to_nhwc(np.asarray(data), source)
    if images.dtype != np.uint8:
        raise DataError(f"{source}: expected uint8 pixels, found {images.dtype}")
    return images, np.asarray(labels, dtype=np.int64)


def _assemble(parts: dict[str, bytes], source: str) -> CifarArrays:
    train = [parse_batch(parts[name], f"{source}/{name}") for name in TRAIN_BATCHES]
    x_test, y_test = parse_batch(parts[TEST_BATCH], f"{source}/{TEST_BATCH}")
    return CifarArrays(
        x_train=np.concatenate([x for x, _ in train]),
        y_train=np.concatenate([y for _, y in train]),
        x_test=x_test,
        y_test=y_test,
        source=source,
    )


def read_batches_folder(folder: Path) -> CifarArrays:
    """The official python layout: data_batch_1..5 and test_batch pickles."""
    missing = [n for n in (*TRAIN_BATCHES, TEST_BATCH) if not (folder / n).is_file()]
    if missing:
        raise DataError(f"{folder}: missing {', '.join(missing)}; expected the official "
                        f"'{FOLDER_NAME}' layout (data_batch_1..5, test_batch)")
    parts = {name: (folder / name).read_bytes() for name in (*TRAIN_BATCHES, TEST_BATCH)}
    arrays = _assemble(parts, str(folder))
    arrays.checksums = {name: hashlib.sha256(raw).hexdigest() for name, raw in parts.items()}
    return arrays


def read_archive(path: Path) -> CifarArrays:
    """The official cifar-10-python.tar.gz, read in place without extracting."""
    try:
        with tarfile.open(path, "r:gz") as tar:
            members = {Path(m.name).name: m for m in tar.getmembers() if m.isfile()}
            missing = [n for n in (*TRAIN_BATCHES, TEST_BATCH) if n not in members]
            if missing:
                raise DataError(f"{path}: archive lacks {', '.join(missing)}")
            parts = {name: tar.extractfile(members[name]).read() for name in (*TRAIN_BATCHES, TEST_BATCH)}
    except (tarfile.TarError, EOFError, OSError) as err:
        raise DataError(f"{path}: cannot read the archive ({err}); it is truncated or not a tar.gz: "
                        "delete it and supply a fresh copy") from None
    arrays = _assemble(parts, str(path))
    arrays.checksums = {path.name: sha256_file(path)}
    return arrays


def read_npz(path: Path) -> CifarArrays:
    """An .npz with x_train, y_train, x_test, y_test (images NHWC uint8)."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            missing = [k for k in ("x_train", "y_train", "x_test", "y_test") if k not in npz.files]
            if missing:
                raise DataError(f"{path}: missing arrays {', '.join(missing)}; found {', '.join(npz.files)}")
            arrays = CifarArrays(npz["x_train"], npz["y_train"].astype(np.int64).reshape(-1),
                                 npz["x_test"], npz["y_test"].astype(np.int64).reshape(-1), source=str(path))
    except (OSError, ValueError, EOFError) as err:
        raise DataError(f"{path}: cannot read the .npz ({err})") from None
    arrays.checksums = {path.name: sha256_file(path)}
    return arrays


def validate(arrays: CifarArrays, require_full_size: bool = True) -> None:
    """Shape, dtype, label range; with require_full_size also the official sizes and class balance."""
    for split in ("train", "test"):
        x, y = getattr(arrays, f"x_{split}"), getattr(arrays, f"y_{split}")
        where = f"{arrays.source} ({split} split)"
        if x.dtype != np.uint8:
            raise DataError(f"{where}: expected uint8 images, found {x.dtype}")
        count = EXPECTED_COUNTS[split] if require_full_size else len(x)
        if x.shape != (count, 32, 32, 3):
            raise DataError(f"{where}: expected images of shape ({count}, 32, 32, 3), found {x.shape}")
        if y.shape != (len(x),):
            raise DataError(f"{where}: expected {len(x)} labels, found shape {y.shape}")
        if y.min() < 0 or y.max() >= NUM_CLASSES:
            raise DataError(f"{where}: labels must lie in 0..{NUM_CLASSES - 1}, found {y.min()}..{y.max()}")
        counts = np.bincount(y, minlength=NUM_CLASSES)
        if require_full_size and len(set(counts.tolist())) != 1:
            raise DataError(f"{where}: expected {len(x) // NUM_CLASSES} images per class, found {counts.tolist()}")


def candidate_paths(root: Path, npz_name: str) -> list[Path]:
    return [root / FOLDER_NAME, root / ARCHIVE_NAME, root / npz_name]


def download_archive(root: Path) -> Path:
    """Fetch the official archive into root and check its published MD5; a failed download leaves nothing,
    not even the folders it made."""
    made = [folder for folder in (root, *root.parents) if not folder.exists()]
    root.mkdir(parents=True, exist_ok=True)
    target = root / ARCHIVE_NAME
    with tempfile.NamedTemporaryFile(dir=root, prefix=".download-", delete=False) as tmp:
        try:
            with urllib.request.urlopen(ARCHIVE_URL, timeout=30) as response:
                while chunk := response.read(1 << 20):
                    tmp.write(chunk)
            problem = None
        except OSError as err:
            problem = f"download of {ARCHIVE_URL} failed: {err}"
    if problem is None:
        md5 = hashlib.md5(Path(tmp.name).read_bytes()).hexdigest()
        if md5 == ARCHIVE_MD5:
            Path(tmp.name).replace(target)
            return target
        problem = f"downloaded archive has MD5 {md5}, expected {ARCHIVE_MD5}; try again"
    Path(tmp.name).unlink(missing_ok=True)
    for folder in made:  # innermost first
        folder.rmdir()
    raise DataError(problem)


def load_cifar10(root: str | Path, download: bool = False, npz_name: str = "cifar10.npz",
                 require_full_size: bool = True) -> CifarArrays:
    """Find CIFAR-10 under root (folder, archive or .npz, in that order), download if allowed."""
    root = Path(root)
    folder, archive, npz = candidate_paths(root, npz_name)
    if folder.is_dir():
        arrays = read_batches_folder(folder)
    elif archive.is_file():
        arrays = read_archive(archive)
    elif npz.is_file():
        arrays = read_npz(npz)
    else:
        looked = "\n  ".join(str(p) for p in (folder, archive, npz))
        how = (f"put the official '{FOLDER_NAME}' folder or '{ARCHIVE_NAME}' in {root}, "
               f"or point data.root at the folder that holds them")
        if not download:
            raise DataError(f"CIFAR-10 not found; looked in:\n  {looked}\n{how} (or set data.download=true)")
        try:
            arrays = read_archive(download_archive(root))
        except DataError as err:
            raise DataError(f"CIFAR-10 not found; looked in:\n  {looked}\nand {err}.\n{how}") from None
    validate(arrays, require_full_size)
    return arrays


def read_image_pickle(path: str | Path) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """A pickle of test images → (NHWC uint8, ids, labels or None).

    The official test batch (`data` rows, `labels`) or a competition test pickle (`data` as
    (N, 3072) rows or (N, 32, 32, 3), `ids`); keys may be str or bytes. Without ids, 0..N-1.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file; expected a pickle of test images (test_batch, cifar_test.pkl)")
    batch = load_pickle_bytes(path.read_bytes(), str(path))
    try:
        data = np.asarray(_get(batch, "data"))
    except KeyError:
        raise DataError(f"{path}: missing key 'data' (found {', '.join(map(repr, batch))})") from None
    if data.ndim == 4 and data.shape[1:] == (32, 32, 3):
        images = np.ascontiguousarray(data)
    else:
        images = rows_to_nhwc(data, str(path))
    if images.dtype != np.uint8:
        raise DataError(f"{path}: expected uint8 pixels, found {images.dtype}")
    try:
        ids = np.asarray(_get(batch, "ids"))
    except KeyError:
        ids = np.arange(len(images))
    if len(ids) != len(images):
        raise DataError(f"{path}: {len(ids)} ids for {len(images)} images")
    try:
        labels = np.asarray(_get(batch, "labels"))
    except KeyError:
        labels = None
    if labels is not None and labels.shape != (len(images),):
        raise DataError(f"{path}: expected {len(images)} labels, found shape {labels.shape}")
    return images, ids, labels


def read_unlabeled(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """A competition test pickle: {b'data': (N, 3072) rows or (N, 32, 32, 3), b'ids': ...} → (NHWC, ids)."""
    images, ids, _ = read_image_pickle(path)
    return images, ids
