"""Readers, prepare (betons + manifest) and bad input, on the real data and on small written files."""
from __future__ import annotations

import json
import pickle
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest

from cifar_dist.config import load_config
from cifar_dist.data.beton import checked_beton
from cifar_dist.data.cifar import load_cifar10, read_unlabeled
from cifar_dist.errors import DataError
from cifar_dist.data.loaders import build_loader
from cifar_dist.data.splits import stratified_split
from conftest import REPO, balanced_labels, id_images, leftover_processes, run_cli, write_batches_folder

SMALL = ["data.require_full_size=false", "data.num_workers=1"]


def test_real_data_counts_and_statistics(real_data_root):
    arrays = load_cifar10(real_data_root)
    assert arrays.x_train.shape == (50_000, 32, 32, 3) and arrays.x_test.shape == (10_000, 32, 32, 3)
    assert np.bincount(arrays.y_train).tolist() == [5000] * 10
    assert np.bincount(arrays.y_test).tolist() == [1000] * 10
    pixels = arrays.x_train.reshape(-1, 3).astype(np.float64) / 255
    np.testing.assert_allclose(pixels.mean(axis=0), [0.4914, 0.4822, 0.4465], atol=5e-5)
    np.testing.assert_allclose(pixels.std(axis=0), [0.2470, 0.2435, 0.2616], atol=5e-5)


def test_real_data_rejects_a_smaller_copy_by_default(tmp_path):
    write_batches_folder(tmp_path, id_images(500), balanced_labels(500), id_images(100), balanced_labels(100))
    with pytest.raises(DataError, match=r"expected images of shape \(50000, 32, 32, 3\)"):
        load_cifar10(tmp_path)
    assert len(load_cifar10(tmp_path, require_full_size=False).y_train) == 500


def test_str_and_bytes_keys_give_the_same_arrays(tmp_path, small_cifar):
    bytes_keys = load_cifar10(small_cifar, require_full_size=False)
    folder = tmp_path / "strkeys" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for path in (small_cifar / "cifar-10-batches-py").iterdir():
        batch = pickle.loads(path.read_bytes())
        (folder / path.name).write_bytes(pickle.dumps({k.decode(): v for k, v in batch.items()}, protocol=2))
    str_keys = load_cifar10(folder.parent, require_full_size=False)
    assert np.array_equal(bytes_keys.x_train, str_keys.x_train)
    assert np.array_equal(bytes_keys.y_test, str_keys.y_test)
    # The channel-major rows became NHWC: pixel (0, 0) red holds the id written by id_images.
    assert bytes_keys.x_train[:5, 0, 0, 0].tolist() == [0, 1, 2, 3, 4]


def test_archive_read_in_place(tmp_path, small_cifar):
    archive = tmp_path / "arch" / "cifar-10-python.tar.gz"
    archive.parent.mkdir()
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(small_cifar / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    from_archive = load_cifar10(archive.parent, require_full_size=False)
    from_folder = load_cifar10(small_cifar, require_full_size=False)
    assert np.array_equal(from_archive.x_train, from_folder.x_train)
    assert np.array_equal(from_archive.y_train, from_folder.y_train)
    assert not (archive.parent / "cifar-10-batches-py").exists()  # nothing extracted


def test_npz_reader(tmp_path):
    x_train, x_test = id_images(200), id_images(50, seed=3)
    np.savez(tmp_path / "cifar10.npz", x_train=x_train, y_train=balanced_labels(200), x_test=x_test,
             y_test=balanced_labels(50))
    arrays = load_cifar10(tmp_path, require_full_size=False)
    assert np.array_equal(arrays.x_train, x_train) and arrays.y_train.dtype == np.int64


def test_unlabeled_pickle_both_layouts(tmp_path):
    images = id_images(7)
    rows = images.transpose(0, 3, 1, 2).reshape(7, -1)
    for name, data in (("rows.pkl", rows), ("nhwc.pkl", images)):
        (tmp_path / name).write_bytes(pickle.dumps({b"data": data, b"ids": np.arange(100, 107)}, protocol=2))
        read, ids = read_unlabeled(tmp_path / name)
        assert np.array_equal(read, images) and ids.tolist() == list(range(100, 107))
    (tmp_path / "bad.pkl").write_bytes(pickle.dumps({b"data": np.zeros((7, 100), np.uint8)}))
    with pytest.raises(DataError, match="bad.pkl.*3072"):
        read_unlabeled(tmp_path / "bad.pkl")


def test_stratified_split_is_seeded_and_exact():
    labels = np.repeat(np.arange(10), 50)
    train, val = stratified_split(labels, 0.1, seed=4)
    assert np.bincount(labels[val]).tolist() == [5] * 10
    assert len(np.intersect1d(train, val)) == 0 and len(train) + len(val) == 500
    assert np.array_equal(val, stratified_split(labels, 0.1, seed=4)[1])
    assert not np.array_equal(val, stratified_split(labels, 0.1, seed=5)[1])
    assert len(stratified_split(labels, 0.0, seed=4)[1]) == 0


def _mtimes(folder: Path) -> dict:
    return {p.name: (p.stat().st_mtime_ns, p.stat().st_ino) for p in folder.iterdir()}


def test_prepare_real_data_idempotent_atomic_and_rebuilding(tmp_path, real_data_root):
    beton_dir = tmp_path / "beton"
    args = ["prepare", f"data.root={real_data_root}", f"data.beton_dir={beton_dir}", "data.num_workers=2"]
    result = run_cli(*args)
    assert result.returncode == 0, result.stderr
    manifest = json.loads((beton_dir / "manifest.json").read_text())
    counts = {split: entry["num_images"] for split, entry in manifest["splits"].items()}
    assert counts == {"train": 45_000, "val": 5_000, "test": 10_000}
    assert manifest["splits"]["train"]["per_class"] == [4500] * 10
    assert manifest["splits"]["val"]["per_class"] == [500] * 10
    assert manifest["inputs"]["ffcv_version"] == "1.0.2"
    assert sorted(manifest["inputs"]["source_checksums"]) == [
        "data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "test_batch"]
    cfg = load_config(None, [f"data.root={real_data_root}", f"data.beton_dir={beton_dir}"])
    assert build_loader(cfg.data, "val", 1000, train=False).num_samples == 5000

    before = _mtimes(beton_dir)
    again = run_cli(*args)
    assert again.returncode == 0 and "nothing rewritten" in again.stdout
    assert _mtimes(beton_dir) == before

    # A changed option rebuilds; killed mid-write, it leaves the previous good set untouched.
    changed = [*args, "data.val_fraction=0.2"]
    proc = subprocess.Popen([sys.executable, "-m", "cifar_dist", *changed], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not list(beton_dir.glob(".tmp-train.beton*")) and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert _mtimes(beton_dir).keys() >= before.keys()
    assert {k: v for k, v in _mtimes(beton_dir).items() if k in before} == before
    assert build_loader(cfg.data, "val", 1000, train=False).num_samples == 5000

    rebuilt = run_cli(*changed)
    assert rebuilt.returncode == 0, rebuilt.stderr
    manifest = json.loads((beton_dir / "manifest.json").read_text())
    assert manifest["splits"]["val"]["num_images"] == 10_000
    assert not list(beton_dir.glob(".tmp-*"))  # the killed run's temporaries were cleaned up


def test_prepare_killed_on_fresh_folder_leaves_nothing_readable(tmp_path, real_data_root):
    beton_dir = tmp_path / "beton"
    proc = subprocess.Popen([sys.executable, "-m", "cifar_dist", "prepare", f"data.root={real_data_root}",
                             f"data.beton_dir={beton_dir}"], cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not list(beton_dir.glob(".tmp-val.beton*")) and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    deadline = time.time() + 10  # FFCV's writer workers die with prepare (they were orphaned before)
    while leftover_processes() and time.time() < deadline:
        time.sleep(0.2)
    assert leftover_processes() == []
    assert not (beton_dir / "manifest.json").exists()
    assert not (beton_dir / "train.beton").exists()
    cfg = load_config(None, [f"data.root={real_data_root}", f"data.beton_dir={beton_dir}"])
    with pytest.raises(DataError, match="run `cifar-dist prepare"):
        checked_beton(cfg.data, "train")


def test_prepare_small_val_fraction_zero(tmp_path, small_cifar):
    result = run_cli("prepare", f"data.root={small_cifar}", "data.val_fraction=0", *SMALL)
    assert result.returncode == 0, result.stderr
    manifest = json.loads((small_cifar / "beton" / "manifest.json").read_text())
    assert [manifest["splits"][s]["num_images"] for s in ("train", "val", "test")] == [500, 0, 100]


def _corrupt_pickle(root: Path) -> str:
    path = root / "cifar-10-batches-py" / "data_batch_3"
    path.write_bytes(path.read_bytes()[:1000])
    return "data_batch_3"


def _wrong_shape(root: Path) -> str:
    path = root / "cifar-10-batches-py" / "data_batch_2"
    batch = pickle.loads(path.read_bytes())
    batch[b"data"] = batch[b"data"][:, :1000]
    path.write_bytes(pickle.dumps(batch, protocol=2))
    return r"data_batch_2: expected image rows of shape \(N, 3072\)"


def _labels_out_of_range(root: Path) -> str:
    path = root / "cifar-10-batches-py" / "test_batch"
    batch = pickle.loads(path.read_bytes())
    batch[b"labels"][0] = 12
    path.write_bytes(pickle.dumps(batch, protocol=2))
    return r"test split\): labels must lie in 0..9, found 0..12"


def _missing_folder(root: Path) -> str:
    for path in (root / "cifar-10-batches-py").iterdir():
        path.unlink()
    (root / "cifar-10-batches-py").rmdir()
    return "CIFAR-10 not found; looked in"


@pytest.mark.parametrize("damage", [_corrupt_pickle, _wrong_shape, _labels_out_of_range, _missing_folder])
def test_prepare_bad_input_fails_clearly_and_keeps_good_betons(small_cifar, damage):
    args = ["prepare", f"data.root={small_cifar}", "data.download=false", *SMALL]
    assert run_cli(*args).returncode == 0
    beton_dir = small_cifar / "beton"
    before = {p.name: p.read_bytes() for p in beton_dir.iterdir()}
    expected = damage(small_cifar)
    result = run_cli(*args)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert __import__("re").search(expected, result.stderr), result.stderr
    assert {p.name: p.read_bytes() for p in beton_dir.iterdir()} == before


def test_missing_data_without_download_names_every_place(tmp_path):
    result = run_cli("prepare", f"data.root={tmp_path}", "data.download=false")
    assert result.returncode == 2
    for name in ("cifar-10-batches-py", "cifar-10-python.tar.gz", "cifar10.npz"):
        assert str(tmp_path / name) in result.stderr
    assert not (tmp_path / "beton").exists()


def test_corrupted_beton_is_reported_by_prepare_and_loader(small_cifar):
    args = ["prepare", f"data.root={small_cifar}", *SMALL]
    assert run_cli(*args).returncode == 0
    train = small_cifar / "beton" / "train.beton"
    raw = bytearray(train.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    train.write_bytes(bytes(raw))
    result = run_cli(*args)
    assert result.returncode == 2 and "train.beton does not match the checksum" in result.stderr
    assert train.read_bytes() == bytes(raw)  # reported, not silently replaced
    cfg = load_config(None, [f"data.root={small_cifar}", *SMALL])
    with pytest.raises(DataError, match="corrupted"):
        build_loader(cfg.data, "train", 10, train=True)
    assert run_cli(*args, "--force").returncode == 0
    assert build_loader(cfg.data, "train", 10, train=True).num_samples == 450


def test_unwritable_beton_dir_is_a_clear_error(small_cifar, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    result = run_cli("prepare", f"data.root={small_cifar}", f"data.beton_dir={blocker / 'beton'}", *SMALL)
    assert result.returncode == 2 and "cannot write betons to" in result.stderr
    assert "data.beton_dir" in result.stderr and "Traceback" not in result.stderr


def test_download_checks_the_published_md5(tmp_path, small_cifar, monkeypatch):
    import hashlib

    from cifar_dist.data import cifar

    source = tmp_path / "mirror" / "cifar-10-python.tar.gz"
    source.parent.mkdir()
    with tarfile.open(source, "w:gz") as tar:
        tar.add(small_cifar / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    monkeypatch.setattr(cifar, "ARCHIVE_URL", source.as_uri())
    monkeypatch.setattr(cifar, "ARCHIVE_MD5", "0" * 32)
    with pytest.raises(DataError, match="downloaded archive has MD5 .* expected 0000"):
        load_cifar10(tmp_path / "root", download=True, require_full_size=False)
    assert not (tmp_path / "root").exists()  # nothing half-downloaded left behind, not even the folder
    monkeypatch.setattr(cifar, "ARCHIVE_MD5", hashlib.md5(source.read_bytes()).hexdigest())
    arrays = load_cifar10(tmp_path / "root", download=True, require_full_size=False)
    assert len(arrays.y_train) == 500 and (tmp_path / "root" / "cifar-10-python.tar.gz").is_file()
    monkeypatch.setattr(cifar, "ARCHIVE_URL", (tmp_path / "nowhere.tar.gz").as_uri())
    with pytest.raises(DataError, match="(?s)CIFAR-10 not found; looked in.*download of .* failed"):
        load_cifar10(tmp_path / "other", download=True, require_full_size=False)
    assert not (tmp_path / "other").exists()
