"""The one way this package writes a file that others read: whole or not at all."""
from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Callable, Iterable


def atomic_write(path: Path | str, write: Callable[[Path], object], fsync: bool = True,
                 keep_previous: Path | None = None) -> Path:
    """Call write(tmp) on a temporary name beside path, then rename it over path.

    A reader (or a resume after SIGKILL) sees the old file or the new one, never half of one; a
    failing write leaves path untouched and removes its temporary. With fsync, the data and the
    rename reach the disk before this returns. With keep_previous, the current file is moved
    there once the new one is whole, just before the new one takes its name.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        if fsync:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        if keep_previous is not None and path.exists():
            os.replace(path, keep_previous)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    if fsync:
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    return path


def write_csv(path: Path | str, columns: list[str], rows: Iterable, fsync: bool = False) -> Path:
    """A CSV with a header row, written with atomic_write."""
    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="") as f:
            writer = csv.writer(f, lineterminator="\n")
            writer.writerow(columns)
            writer.writerows(rows)

    return atomic_write(path, write, fsync=fsync)
