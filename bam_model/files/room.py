"""Room: this machine's physical memory, the free space of a disk, sizes in words."""
from __future__ import annotations

import os
import shutil
from pathlib import Path


def physical_memory() -> int | None:
    """Bytes of physical memory of this machine (None where the OS does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return None


def gib(nbytes: float) -> str:
    """A size in words: ``12.3 GiB``, ``540.0 KiB``."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if nbytes >= scale:
            return f"{nbytes / scale:,.1f} {unit}"
    return f"{int(nbytes)} bytes"


def check_free_space(path, nbytes: int, what: str) -> None:
    """Refuse, before writing, ``nbytes`` of ``what`` into ``path`` (a folder, made or not) when its
    file system has less room than that."""
    free = shutil.disk_usage(nearest_existing(Path(os.path.abspath(path)))).free
    if nbytes > free:
        raise ValueError(f"{what} takes {gib(nbytes)}, more than the {gib(free)} free on the disk of "
                         f"{os.fspath(path)!r}; free some space or write elsewhere")


def nearest_existing(path: Path) -> Path:
    """``path``, or its nearest parent that exists."""
    while not os.path.lexists(path) and path != path.parent:
        path = path.parent
    return path
