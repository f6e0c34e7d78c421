"""Shared fixtures: the real data folder, small synthetic CIFAR-10 copies, a CLI runner."""
from __future__ import annotations

import os
import pickle
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def real_data_root() -> Path:
    """The folder holding cifar-10-batches-py, from CIFAR_DIST_DATA (set by .ci/run)."""
    value = os.environ.get("CIFAR_DIST_DATA")
    if not value or not (Path(value) / "cifar-10-batches-py").is_dir():
        pytest.fail("set CIFAR_DIST_DATA to a folder holding cifar-10-batches-py (e.g. ../shared/data); "
                    f"got {value!r}")
    return Path(value)


def id_images(count: int, seed: int = 0) -> np.ndarray:
    """NHWC uint8 images whose first two bytes encode their index (to track them through loaders)."""
    images = np.random.default_rng(seed).integers(0, 256, size=(count, 32, 32, 3), dtype=np.uint8)
    images[:, 0, 0, 0] = np.arange(count) % 256
    images[:, 0, 0, 1] = np.arange(count) // 256
    return images


def decode_ids(images_nchw) -> np.ndarray:
    """Inverse of id_images for a uint8 NCHW batch (any device)."""
    first = images_nchw[:, :2, 0, 0].cpu().numpy().astype(np.int64)
    return first[:, 0] + 256 * first[:, 1]


def balanced_labels(count: int) -> np.ndarray:
    return np.arange(count) % 10


def write_batches_folder(root: Path, x_train, y_train, x_test, y_test) -> Path:
    """The official python layout, pickled like Python 2 did (protocol 2, bytes keys)."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)

    def dump(name, x, y):
        rows = x.transpose(0, 3, 1, 2).reshape(len(x), -1)
        batch = {b"batch_label": name.encode(), b"labels": [int(v) for v in y], b"data": rows}
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f, protocol=2)

    for i, (xs, ys) in enumerate(zip(np.array_split(x_train, 5), np.array_split(y_train, 5)), start=1):
        dump(f"data_batch_{i}", xs, ys)
    dump("test_batch", x_test, y_test)
    return folder


@pytest.fixture
def small_cifar(tmp_path) -> Path:
    """A data root with a 500/100-image balanced copy in the official layout."""
    root = tmp_path / "data"
    write_batches_folder(root, id_images(500), balanced_labels(500), id_images(100, seed=1), balanced_labels(100))
    return root


def run_cli(*args, cwd=REPO, timeout=600, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cifar_dist", *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **(env or {})})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_torchrun(nproc: int, module_args: list, cwd=REPO, timeout=600, extra=(), env=None):
    """`torchrun --nproc-per-node N ... -m <module args>` on loopback, gloo."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-addr",
           "127.0.0.1", "--master-port", str(free_port()), *extra, *map(str, module_args)]
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})
