"""Prepared data opened once per process, and the cache that raw ``--data`` paths and the bundled
corpus are prepared into once (``cache_root``), keyed by the files and the tokenizer."""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import sys
from pathlib import Path

from ..files.atomic import umask
from ..files.manifest import clear_owned, read_manifest
from ..files.reading import read_json
from .heldout import HELDOUT_FRACTION
from .index import DATA_FORMAT, DATA_VERSION, INDEX, tokenizer_digest
from .inputs import Input
from .prepared import PreparedData, is_prepared
from .write import prepare

CACHE_ENV = "BAM_DATA_CACHE"


def cache_root() -> Path:
    """Where raw ``--data`` paths and the bundled corpus are prepared: ``$BAM_DATA_CACHE``, else
    ``$XDG_CACHE_HOME/bam/data``, else ``~/.cache/bam/data``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "bam" / "data"


_OPEN: dict[tuple, PreparedData] = {}


def cached(inputs: list[Input], tokenizer, *, text_field: str = "text", what: str = "data",
           progress=None) -> PreparedData:
    """``inputs`` prepared with ``tokenizer`` in the cache (``cache_root``): prepared once, then
    opened. The key: each file's path, size and modification time, the tokenizer and the options.
    Processes preparing one key wait for each other (the first prepares, the rest open it)."""
    stats = []
    for i in inputs:
        st = i.path.stat()
        stats.append((str(i.path), i.key, i.split, st.st_size, st.st_mtime_ns))
    key_text = json.dumps({"version": DATA_VERSION, "tokenizer": tokenizer_digest(tokenizer),
                           "text_field": text_field, "heldout": HELDOUT_FRACTION, "inputs": stats},
                          sort_keys=True)
    key = hashlib.sha256(key_text.encode()).hexdigest()[:32]
    if (key,) in _OPEN:
        return _OPEN[(key,)]
    root = cache_root()
    folder = root / key
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"data: cannot make the data cache {str(root)!r} ({e.strerror}); set {CACHE_ENV} "
                         "to a writable folder") from None
    with _wait_lock(root / f"{key}.lock"):
        opened = None
        if is_prepared(folder):
            with contextlib.suppress(ValueError):
                opened = PreparedData(folder)
        if opened is None:
            print(f"data: preparing {what} once, into the cache {str(folder)!r}", file=sys.stderr)
            opened = prepare(None, tokenizer, folder, text_field=text_field, progress=progress, inputs=inputs,
                             flag="data cache")
            _remove_stale(root, key, opened.index)
    _OPEN[(key,)] = opened
    return opened


def _remove_stale(root: Path, key: str, index: dict) -> None:
    """Remove the cache entries that ``index``'s entry replaces: of the same files (by path), the
    same tokenizer and options, prepared before those files changed. An entry another process
    holds (its lock taken) is left for later."""
    def same(other: dict) -> bool:
        try:
            return (other.get("format") == DATA_FORMAT
                    and [s["path"] for s in other["sources"]] == [s["path"] for s in index["sources"]]
                    and other["tokenizer"]["sha256"] == index["tokenizer"]["sha256"]
                    and other.get("text_field") == index["text_field"])
        except (KeyError, TypeError, AttributeError):    # an index of another layout: not ours to judge
            return False

    for entry in root.iterdir():
        if entry.name == key or not entry.is_dir() or entry.is_symlink() or not (entry / INDEX).is_file():
            continue
        manifest = read_manifest(entry)
        try:
            stale = (manifest is not None and manifest["kind"] == "data"
                     and same(read_json(str(entry / INDEX))))
        except ValueError:
            continue
        if not stale:
            continue
        lock = root / f"{entry.name}.lock"
        fd = _open_lock(lock)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            continue
        try:
            clear_owned(entry)
            with contextlib.suppress(OSError):
                entry.rmdir()
            with contextlib.suppress(OSError):
                lock.unlink()
        finally:
            os.close(fd)


def _open_lock(path: Path) -> int:
    """The lock file beside a cache entry (created; never opened through a link)."""
    return os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666 & ~umask())


@contextlib.contextmanager
def _wait_lock(path: Path):
    """An exclusive ``flock`` on ``path`` (created), waited for: processes preparing one cache entry
    take turns."""
    fd = _open_lock(path)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def open_prepared(path) -> PreparedData:
    """A prepared-data folder, opened once per process."""
    path = os.path.abspath(path)
    try:
        st = os.stat(os.path.join(path, INDEX))
    except FileNotFoundError:
        return PreparedData(path)       # says what the folder lacks
    key = (path, st.st_mtime_ns, st.st_size)
    if key not in _OPEN:
        _OPEN[key] = PreparedData(path)
    return _OPEN[key]
