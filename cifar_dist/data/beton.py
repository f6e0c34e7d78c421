"""`cifar-dist prepare`: raw CIFAR-10 → train/val/test .beton files and manifest.json.

Idempotent (same inputs and options: nothing rewritten) and atomic (betons are written under
temporary names; the manifest that vouches for them is removed first and written last, so an
interrupted prepare never leaves a beton that a loader would accept). Ctrl-C or a full disk stops
FFCV's writer workers, removes the temporaries and says so in one line (exit code 130 or 2).
"""
from __future__ import annotations

import json
import multiprocessing
import os
import queue
from importlib import metadata
from pathlib import Path

import numpy as np

from cifar_dist.atomic import atomic_write, disk_full_as_user_error
from cifar_dist.config import DataConfig
from cifar_dist.data.cifar import load_cifar10, sha256_file
from cifar_dist.cifar10 import CLASS_NAMES, NUM_CLASSES
from cifar_dist.errors import DataError
from cifar_dist.data.splits import SPLITS, split_arrays
from cifar_dist.lifetime import children_die_with_parent, children_leave_ctrl_c_to_parent

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
TMP_PREFIX = ".tmp-"
PAGE_BYTES = 8 << 20  # FFCV's default page: workers write whole pages, so each ends the file on a part-filled one
CHUNK_IMAGES = 500  # images per item of the writer's work queue


def require_ffcv():
    """Import ffcv or fail with a message naming the package and how to get it."""
    try:
        import ffcv  # noqa: F401
    except ImportError as err:
        raise DataError(
            f"the 'ffcv' package is needed for .beton files but cannot be imported ({err}); "
            "install it with `pip install -e .[ffcv]` (after `apt-get install pkg-config libopencv-dev "
            "libturbojpeg0-dev`), or use data.loader=gpu or data.loader=torchvision, which need no beton"
        ) from None
    return ffcv


def ffcv_version() -> str:
    try:
        return metadata.version("ffcv")
    except metadata.PackageNotFoundError:
        return "not installed"


class _ArrayDataset:
    """The indexable dataset FFCV's writer asks for: (HWC uint8 image, int label)."""

    def __init__(self, images: np.ndarray, labels: np.ndarray):
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        return self.images[index], int(self.labels[index])


def write_beton(path: Path, images: np.ndarray, labels: np.ndarray, num_workers: int) -> None:
    """Write one split as raw RGB images and int labels, with FFCV's writer workers under our control.

    This is `DatasetWriter.from_indexed_dataset` step by step (ffcv is pinned to 1.0.2), because FFCV's own
    loop waits forever for a worker that failed (a full disk), leaves Ctrl-C to print a traceback in every
    worker, and blocks the exit on its work queue. Here a worker's OSError is raised in this process, only
    this process sees Ctrl-C, and however the write ends, no worker outlives it.
    """
    require_ffcv()
    from ffcv.fields import IntField, RGBImageField
    from ffcv.memory_allocator import MemoryAllocator
    from ffcv.writer import DatasetWriter

    fields = {"image": RGBImageField(write_mode="raw"), "label": IntField()}
    writer = DatasetWriter(str(path), fields, page_size=PAGE_BYTES, num_workers=max(1, num_workers))
    writer.num_samples = len(labels)
    forked = multiprocessing.get_context("fork")  # the workers get the images by fork, not by pickle
    work, results = forked.Queue(), forked.Queue()
    done = forked.Value("Q", 0)  # FFCV's progress counter: unused, the results say when each worker is done
    workers = []
    writer.prepare()  # the header; the images' metadata table in shared memory, removed below
    try:
        allocator = MemoryAllocator(writer.fname, writer.data_region_start, writer.page_size)
        job = (work, writer.metadata_sm, writer.metadata_type, writer.fields, allocator, done, results,
               _ArrayDataset(images, labels))
        workers = [forked.Process(target=_write_pages, args=job, daemon=True) for _ in range(writer.num_workers)]
        children_die_with_parent()  # the workers (~800 MB each) may not outlive a killed prepare either
        for start in range(0, len(labels), CHUNK_IMAGES):
            work.put([(i, i) for i in range(start, min(start + CHUNK_IMAGES, len(labels)))])
        for _ in workers:
            work.put(None)  # one end-of-work mark each
        with children_leave_ctrl_c_to_parent():
            for worker in workers:
                worker.start()
        allocations = []
        for _ in workers:
            allocations.extend(_next_result(results, workers))
        writer.finalize(allocations)  # the metadata table and where each image lies
    finally:
        for worker in workers:
            if worker.pid is not None:
                worker.kill()  # those that sent their result have nothing left to do
                worker.join()
        work.cancel_join_thread()  # its feeder thread may be stuck on a pipe nobody reads any more
        writer.metadata_sm.close()
        writer.metadata_sm.unlink()


def _write_pages(work, metadata, metadata_type, fields, allocator, done, results, dataset) -> None:
    """One writer worker: FFCV's, but an OSError (a full disk) is sent back as its result instead of printed."""
    from ffcv.writer import worker_job_indexed_dataset

    try:
        worker_job_indexed_dataset(work, metadata, metadata_type, fields, allocator, done, results, dataset)
    except OSError as err:
        results.put(OSError(err.errno, err.strerror, err.filename))


def _next_result(results, workers) -> list:
    """The allocations the next worker to finish sends; its OSError raised here; RuntimeError if one died."""
    while True:
        try:
            result = results.get(timeout=0.2)
        except queue.Empty:
            dead = next((w for w in workers if w.exitcode not in (None, 0)), None)
            if dead is not None:
                raise RuntimeError(f"an FFCV writer worker stopped before finishing its share "
                                   f"(exitcode {dead.exitcode}; negative: the signal that killed it)") from None
            continue
        if isinstance(result, OSError):
            raise result
        return result


def beton_bytes(num_images: int, num_workers: int) -> int:
    """About the size of a beton of raw 32×32 images: the images, the header's page, a part-filled page per worker."""
    if num_images == 0:
        return 0
    return num_images * (32 * 32 * 3 + 24) + (max(1, num_workers) + 1) * PAGE_BYTES


def expected_inputs(cfg: DataConfig, source_checksums: dict) -> dict:
    """What a set of betons depends on: when any of it changes they are rebuilt."""
    return {
        "format_version": FORMAT_VERSION,
        "val_fraction": cfg.val_fraction,
        "split_seed": cfg.split_seed,
        "source_checksums": source_checksums,
        "ffcv_version": ffcv_version(),
    }


def read_manifest(beton_dir: Path) -> dict | None:
    path = beton_dir / MANIFEST
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise DataError(f"{path}: unreadable manifest ({err}); delete it and run `cifar-dist prepare`") from None


def verify_betons(beton_dir: Path, manifest: dict, splits=SPLITS) -> None:
    """Each beton exists with the size and sha256 the manifest recorded."""
    for split in splits:
        entry = manifest["splits"][split]
        path = beton_dir / entry["file"]
        if not path.is_file():
            raise DataError(f"{path} is missing although {beton_dir / MANIFEST} lists it; "
                            "run `cifar-dist prepare --force` to rebuild")
        if path.stat().st_size != entry["bytes"] or sha256_file(path) != entry["sha256"]:
            raise DataError(f"{path} does not match the checksum in {beton_dir / MANIFEST}: it is corrupted "
                            "or was modified; run `cifar-dist prepare --force` to rebuild it")


def _remove_stale_temporaries(beton_dir: Path) -> None:
    for stale in beton_dir.glob(f"{TMP_PREFIX}*"):
        stale.unlink(missing_ok=True)


def prepare(cfg: DataConfig, force: bool = False, log=print) -> Path:
    """Write train/val/test betons and manifest.json under cfg.beton_path(); return the manifest path."""
    require_ffcv()
    beton_dir = cfg.beton_path()
    arrays = load_cifar10(cfg.root, cfg.download, cfg.npz_name, cfg.require_full_size)
    inputs = expected_inputs(cfg, arrays.checksums)
    manifest = read_manifest(beton_dir)
    if manifest is not None and manifest.get("inputs") == inputs and not force:
        verify_betons(beton_dir, manifest)
        log(f"betons in {beton_dir} are up to date with {arrays.source}; nothing rewritten")
        return beton_dir / MANIFEST

    try:
        beton_dir.mkdir(parents=True, exist_ok=True)
        probe = beton_dir / f"{TMP_PREFIX}probe.{os.getpid()}"
        probe.touch()
        probe.unlink()
    except OSError as err:
        raise DataError(f"cannot write betons to {beton_dir} ({err.strerror}); "
                        "set data.beton_dir to a writable folder") from None
    _remove_stale_temporaries(beton_dir)
    splits = split_arrays(arrays, cfg.val_fraction, cfg.split_seed)
    temporaries = {split: beton_dir / f"{TMP_PREFIX}{split}.beton.{os.getpid()}" for split in SPLITS}
    needed = sum(beton_bytes(len(labels), cfg.num_workers) for _, labels in splits.values())
    with disk_full_as_user_error(beton_dir, "the betons", needed, "no beton was replaced: free some space there, "
                                 "or set data.beton_dir to a folder on another disk"):
        try:
            for split, tmp in temporaries.items():
                images, labels = splits[split]
                log(f"writing {split}.beton: {len(labels)} images")
                if len(labels):
                    write_beton(tmp, images, labels, cfg.num_workers)
                else:
                    tmp.write_bytes(b"")  # an empty val split (val_fraction=0): no beton content
                with open(tmp, "rb") as f:
                    os.fsync(f.fileno())
        except BaseException:  # a full disk, Ctrl-C, a crash: nothing half-written stays
            for tmp in temporaries.values():
                tmp.unlink(missing_ok=True)
            raise

    (beton_dir / MANIFEST).unlink(missing_ok=True)  # from here on, no manifest vouches for old files
    entries = {}
    for split, tmp in temporaries.items():
        final = beton_dir / f"{split}.beton"
        os.replace(tmp, final)
        labels = splits[split][1]
        entries[split] = {
            "file": final.name,
            "num_images": int(len(labels)),
            "per_class": np.bincount(labels, minlength=NUM_CLASSES).tolist(),
            "bytes": final.stat().st_size,
            "sha256": sha256_file(final),
        }
    manifest = {"inputs": inputs, "source": arrays.source, "class_names": list(CLASS_NAMES), "splits": entries}
    atomic_write(beton_dir / MANIFEST, lambda tmp: tmp.write_text(json.dumps(manifest, indent=2) + "\n"),
                 if_disk_full="free some space there and run `cifar-dist prepare` again")
    counts = ", ".join(f"{split}: {entry['num_images']}" for split, entry in entries.items())
    log(f"wrote {counts} images to {beton_dir}")
    return beton_dir / MANIFEST


def checked_beton(cfg: DataConfig, split: str) -> tuple[Path, dict]:
    """The beton of one split, verified against its manifest, for a loader to read."""
    beton_dir = cfg.beton_path()
    manifest = read_manifest(beton_dir)
    if manifest is None:
        raise DataError(f"no {MANIFEST} in {beton_dir}: the betons are missing or incomplete; "
                        f"run `cifar-dist prepare data.root={cfg.root}` first")
    if manifest["inputs"]["val_fraction"] != cfg.val_fraction or manifest["inputs"]["split_seed"] != cfg.split_seed:
        raise DataError(f"{beton_dir / MANIFEST} was written with val_fraction="
                        f"{manifest['inputs']['val_fraction']} split_seed={manifest['inputs']['split_seed']}, "
                        f"but the config asks for {cfg.val_fraction} / {cfg.split_seed}; rerun `cifar-dist prepare`")
    verify_betons(beton_dir, manifest, splits=(split,))
    return beton_dir / manifest["splits"][split]["file"], manifest["splits"][split]
