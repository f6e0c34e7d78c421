"""Where commands write: every output location is checked before any work, and a command with several
outputs writes them all or none."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable

from cifar_dist.errors import ConfigError


def check_writable(path: Path | str, what: str, folder: bool = False) -> None:
    """ConfigError naming `what` (an option or key) when path cannot be written: a file where a folder is
    wanted or the reverse, or a nearest existing folder in which no file can be created. Creates nothing
    that stays."""
    path = Path(path).expanduser()
    if path.exists() and path.is_dir() != folder:
        kind = "a folder" if path.is_dir() else "a file"
        raise ConfigError(f"{what} {path} is {kind}; expected {'a folder' if folder else 'a file name'}")
    existing = path if folder and path.is_dir() else path.parent
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"{what} {path} cannot be written: {existing} is a file, not a folder")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as err:
        raise ConfigError(f"{what} {path} cannot be written ({err.strerror or err} in {existing}); choose a "
                          "folder you can write to") from None


def write_together(writers: dict[Path, Callable[[Path], object]]) -> None:
    """Write every path with its writer(tmp) under a temporary name, then rename them all: when one write
    fails, none of the paths is touched."""
    written = {}
    try:
        for path, write in writers.items():
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            handle, tmp = tempfile.mkstemp(dir=Path(path).parent, prefix=f".{Path(path).name}.tmp-")
            os.close(handle)
            written[Path(path)] = Path(tmp)
            write(Path(tmp))
        for path, tmp in written.items():
            os.replace(tmp, path)
    finally:
        for tmp in written.values():
            tmp.unlink(missing_ok=True)

