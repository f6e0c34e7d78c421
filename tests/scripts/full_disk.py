"""Run a script or module as if its disk filled up part-way through a write (for tests/test_faults.py).

Usage: full_disk.py checkpoint N SCRIPT [ARGS...]   the Nth torch.save of a last.pt writes the first half
                                                    of the file, then fails with ENOSPC
       full_disk.py beton N -m MODULE [ARGS...]     in each FFCV writer worker, every page write after the
                                                    first N fails with ENOSPC (the header is already written)
"""
import errno
import io
import os
import runpy
import sys
from pathlib import Path


def disk_full(path) -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))


def fill_on_checkpoint(nth: int) -> None:
    import torch

    original, saves = torch.save, [0]

    def save(obj, f, *args, **kwargs):
        if not Path(f).name.startswith(".last.pt.tmp"):
            return original(obj, f, *args, **kwargs)
        saves[0] += 1
        if saves[0] < nth:
            return original(obj, f, *args, **kwargs)
        whole = io.BytesIO()
        original(obj, whole, *args, **kwargs)
        Path(f).write_bytes(whole.getvalue()[: len(whole.getvalue()) // 2])
        raise disk_full(f)

    torch.save = save


def fill_on_beton(pages_allowed: int) -> None:
    from ffcv.memory_allocator import MemoryAllocator

    original, written = MemoryAllocator.flush_page, [0]  # forked workers count for themselves

    def flush_page(self):
        if self.my_page >= 0:  # a page to write
            if written[0] >= pages_allowed:
                raise disk_full(self.fname)
            written[0] += 1
        original(self)

    MemoryAllocator.flush_page = flush_page


if __name__ == "__main__":
    what, count, rest = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
    {"checkpoint": fill_on_checkpoint, "beton": fill_on_beton}[what](count)
    if rest[0] == "-m":
        sys.argv = [rest[1], *rest[2:]]
        runpy.run_module(rest[1], run_name="__main__", alter_sys=True)
    else:
        sys.argv = rest
        runpy.run_path(rest[0], run_name="__main__")
