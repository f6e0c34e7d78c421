"""The one way this package writes a file that others read: whole or not at all; a full disk is one line."""
from __future__ import annotations

import contextlib
import csv
import errno
import os
import shutil
from pathlib import Path
from typing import Callable, Iterable

from cifar_dist.errors import UserError

DISK_FULL = {errno.ENOSPC: "is full", errno.EDQUOT: "is over its quota"}


def atomic_write(path: Path | str, write: Callable[[Path], object], fsync: bool = True,
                 keep_previous: Path | None = None,
                 if_disk_full: str = "free some space there, or write elsewhere") -> Path:
    """Call write(tmp) on a temporary name beside path, then rename it over path.

    A reader (or a resume after SIGKILL) sees the old file or the new one, never half of one; a
    failing write leaves path untouched and removes its temporary. With fsync, the data and the
    rename reach the disk before this returns. With keep_previous, the current file is moved
    there once the new one is whole, just before the new one takes its name. A full disk is a
    UserError naming the folder, the room free and needed (about the current file's size), then
    if_disk_full: what to do.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    needed = path.stat().st_size if path.is_file() else None
    with disk_full_as_user_error(path.parent, path.name, needed, f"nothing was replaced: {if_disk_full}"):
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


@contextlib.contextmanager
def disk_full_as_user_error(folder: Path, what: str, needed: int | None, what_to_do: str):
    """Within: ENOSPC or EDQUOT becomes a one-line UserError naming folder, what could not be written, the room
    free (once the caller's cleanup inside has run) and, if known, the room needed; other errors pass."""
    try:
        yield
    except OSError as err:
        if err.errno not in DISK_FULL:
            raise
        room = f"{_size(shutil.disk_usage(folder).free)} free"
        if needed:
            room += f", about {_size(needed)} needed"
        raise UserError(f"the disk holding {folder} {DISK_FULL[err.errno]}: cannot write {what} ({room}); "
                        f"{what_to_do}") from None


def _size(num_bytes: int) -> str:
    """'812 B', '3.4 MB', '1.2 GB' (powers of 1000, as df -H)."""
    for unit in ("B", "kB", "MB", "GB"):
        if num_bytes < 1000:
            return f"{num_bytes:.0f} {unit}" if unit == "B" else f"{num_bytes:.1f} {unit}"
        num_bytes /= 1000
    return f"{num_bytes:.1f} TB"


def write_csv(path: Path | str, columns: list[str], rows: Iterable, fsync: bool = False) -> Path:
    """A CSV with a header row, written with atomic_write."""
    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="") as f:
            writer = csv.writer(f, lineterminator="\n")
            writer.writerow(columns)
            writer.writerows(rows)

    return atomic_write(path, write, fsync=fsync)
