"""Pack real CIFAR-10 small enough to carry to a GPU machine: the whole test set and as many training
images as fit in --max-mib, losslessly, as an .npz that `data.root` reads as `cifar10.npz`.

    python benchmarks/pack_data.py pack --data-root DIR [--out benchmarks/data/cifar10.npz] [--max-mib 60]
    python benchmarks/pack_data.py unpack PACKED OUT.npz      # the same arrays, uncompressed (fast reads)

The arrays are stored as .npy members of a zip compressed with LZMA (numpy's loader reads any zip
compression; LZMA makes CIFAR images about 24% smaller, deflate only 8%). The training images are
taken class by class in turn (the first of each class, then the second, ...), so every class has
the same count; within a class they keep the official order. Runs on such a subset need
`data.require_full_size=false`. A file that would exceed the budget is never left behind.
"""
from __future__ import annotations

import argparse
import sys
import zipfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from cifar_dist.atomic import atomic_write  # noqa: E402
from cifar_dist.data.cifar import load_cifar10, read_npz, validate  # noqa: E402
from cifar_dist.cifar10 import NUM_CLASSES
from cifar_dist.errors import DataError

MIB = 2**20
ZIP_OVERHEAD_BYTES = 4096  # headers of four members and the central directory, with room to spare
SAMPLE_IMAGES = 2000  # training images compressed first to estimate the bytes per image


def balanced_order(labels: np.ndarray) -> np.ndarray:
    """Indices taking each class in turn: first of each class, then the second of each, ..."""
    per_class = [np.flatnonzero(labels == c) for c in range(NUM_CLASSES)]
    depth = min(len(members) for members in per_class)
    return np.stack([members[:depth] for members in per_class], axis=1).reshape(-1)


def write_npz(path: Path, arrays: dict[str, np.ndarray], compression: int) -> None:
    with zipfile.ZipFile(path, "w", compression=compression, allowZip64=True) as archive:
        for name, array in arrays.items():
            with archive.open(f"{name}.npy", "w", force_zip64=True) as member:
                np.lib.format.write_array(member, np.ascontiguousarray(array), allow_pickle=False)


def compressed_size(arrays: dict[str, np.ndarray], scratch: Path) -> int:
    try:
        write_npz(scratch, arrays, zipfile.ZIP_LZMA)
        return scratch.stat().st_size
    finally:
        scratch.unlink(missing_ok=True)


def pack(data_root: str, out: Path, max_bytes: int, log=print) -> tuple[int, int, int]:
    """Write out; returns (training images, test images, bytes)."""
    cifar = load_cifar10(data_root, download=False, require_full_size=False)
    order = balanced_order(cifar.y_train)
    test = {"x_test": cifar.x_test, "y_test": cifar.y_test.astype(np.uint8)}
    out.parent.mkdir(parents=True, exist_ok=True)
    scratch = out.with_name(f".{out.name}.estimate")

    def subset(count: int) -> dict[str, np.ndarray]:
        chosen = order[:count]
        return {"x_train": cifar.x_train[chosen], "y_train": cifar.y_train[chosen].astype(np.uint8), **test}

    test_bytes = compressed_size(test, scratch)
    room = max_bytes - test_bytes - ZIP_OVERHEAD_BYTES
    if room < NUM_CLASSES * 3072:
        raise DataError(f"the test set alone packs to {test_bytes / MIB:.1f} MiB, leaving no room for training "
                        f"images under --max-mib {max_bytes / MIB:g}; raise --max-mib")
    sample = min(SAMPLE_IMAGES, len(order))
    per_image = (compressed_size(subset(sample), scratch) - test_bytes) / sample
    count = min(len(order), int(room / per_image * 0.995) // NUM_CLASSES * NUM_CLASSES)
    log(f"test set: {test_bytes / MIB:.1f} MiB; about {per_image:.0f} bytes per training image; trying {count}")
    while True:
        atomic_write(out, lambda tmp: write_npz(tmp, subset(count), zipfile.ZIP_LZMA), fsync=False)
        size = out.stat().st_size
        if size <= max_bytes:
            return count, len(cifar.y_test), size
        out.unlink()
        count = int(count * room / (size - test_bytes) * 0.995) // NUM_CLASSES * NUM_CLASSES
        log(f"{size / MIB:.2f} MiB is over the budget; trying {count} training images")
        if count < NUM_CLASSES:
            raise DataError(f"no training image fits under --max-mib {max_bytes / MIB:g}; raise it")


def unpack(packed: Path, out: Path) -> None:
    """The same arrays in an uncompressed .npz (np.load then reads it at disk speed)."""
    cifar = read_npz(packed)
    validate(cifar, require_full_size=False)
    arrays = {"x_train": cifar.x_train, "y_train": cifar.y_train, "x_test": cifar.x_test, "y_test": cifar.y_test}
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, lambda tmp: write_npz(tmp, arrays, zipfile.ZIP_STORED), fsync=False)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    packer = commands.add_parser("pack", help="real CIFAR-10 → a compressed .npz under the budget")
    packer.add_argument("--data-root", default=None, help="folder holding cifar-10-batches-py (default: "
                                                          "$CIFAR_DIST_DATA)")
    packer.add_argument("--out", type=Path, default=Path("benchmarks/data/cifar10.npz"))
    packer.add_argument("--max-mib", type=float, default=60.0, help="size limit of the file in MiB")
    unpacker = commands.add_parser("unpack", help="a packed .npz → the same arrays uncompressed")
    unpacker.add_argument("packed", type=Path)
    unpacker.add_argument("out", type=Path)
    args = parser.parse_args(argv)
    try:
        if args.command == "unpack":
            unpack(args.packed, args.out)
            print(f"wrote {args.out}")
            return 0
        import os

        data_root = args.data_root or os.environ.get("CIFAR_DIST_DATA")
        if not data_root:
            parser.error("no data: pass --data-root DIR or set CIFAR_DIST_DATA")
        count, test_count, size = pack(data_root, args.out, int(args.max_mib * MIB))
    except DataError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}: {size / MIB:.2f} MiB, the test set ({test_count:,} images) and {count:,} training images "
          f"({count // NUM_CLASSES:,} per class); read it with data.root={args.out.parent} "
          "data.require_full_size=false")
    return 0


if __name__ == "__main__":
    sys.exit(main())
