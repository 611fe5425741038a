"""The file system, safely: atomic writes, fsync, hashes, which folders are ours, and run locks.

Rules every writer of the package follows (see docs/reliability.md):

- A file is written under a temporary name beside its target, fsynced and renamed into place, so a
  crash leaves the old file or the new one, never half of one. New files and folders get the mode
  the user's umask gives (as ``cp`` would); a replaced file keeps its mode.
- A folder is ours only when it holds ``bam-manifest.json``, written by us, which lists the entries
  we wrote. An existing folder is written into only when it is empty or ours; inside it only the
  entries the manifest lists are replaced or removed. Anything else is refused before work starts.
- A training run folder is locked while a run writes it (``fcntl.flock``: released by the kernel
  when the process dies, so ``kill -9`` never leaves a stale lock); a second writer fails at once
  with a message naming the holder.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import math
import os
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path

MANIFEST = "bam-manifest.json"
MANIFEST_FORMAT = "bam-manifest"
LOCK = ".bam-lock"
KINDS = ("model", "run", "demo")
STAGING_PREFIX = ".bam-staging-"


# --- small pieces ----------------------------------------------------------------------------------

def umask() -> int:
    """The process's umask (reading it means setting it, so it is set straight back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def fsync_file(path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def fsync_dir(path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def file_record(path) -> dict:
    """Size and SHA-256 of a file, as manifests and checkpoints list them."""
    return {"bytes": os.path.getsize(path), "sha256": sha256(path)}


def is_within(path, folder) -> bool:
    """Whether ``path`` is ``folder`` or lies inside it (both resolved, symlinks followed)."""
    path, folder = Path(path).resolve(), Path(folder).resolve()
    return path == folder or folder in path.parents


def write_atomic(path, write) -> None:
    """Make the file ``path`` by ``write(temporary path)`` beside it, fsync it and rename it into
    place: a crash leaves the old file or the new one, never half of one. A new file gets the mode
    the umask gives (0644 under the usual 022; mkstemp alone makes 0600), a replaced one keeps its own."""
    path = os.fspath(path)
    folder, name = os.path.split(path)
    try:
        mode = os.stat(path).st_mode & 0o7777
    except FileNotFoundError:
        mode = 0o666 & ~umask()
    fd, tmp = tempfile.mkstemp(dir=folder or ".", prefix=f".{name}.tmp-", suffix=os.path.splitext(name)[1])
    os.close(fd)
    try:
        write(tmp)
        fsync_file(tmp)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_text_atomic(path, text: str) -> None:
    """``write_atomic`` of a UTF-8 text."""
    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
    write_atomic(path, write)


def write_json_atomic(path, obj) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, allow_nan=False) + "\n")


# --- ownership -------------------------------------------------------------------------------------

def read_manifest(folder) -> dict | None:
    """The manifest of a folder we wrote, or None when there is none (or it is not ours)."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        return None
    if (not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT
            or manifest.get("kind") not in KINDS or not isinstance(manifest.get("files"), dict)
            or not all(isinstance(k, str) and _plain_name(k) for k in manifest["files"])):
        return None
    return manifest


def _plain_name(name: str) -> bool:
    """A manifest may list only names directly inside its folder."""
    return bool(name) and name not in (".", "..") and "/" not in name and "\0" not in name


def _version() -> str:
    from importlib import metadata

    try:
        return metadata.version("bam-moe")
    except metadata.PackageNotFoundError:
        return "unknown"


def _manifest(kind: str, files: dict, complete: bool = True, **extra) -> dict:
    return {"format": MANIFEST_FORMAT, "kind": kind, "writer": f"bam-moe {_version()}", "complete": complete,
            "written": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **extra, "files": files}


def _nearest_existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_output(path, kind: str, *, flag: str = "--out", inputs=()) -> str:
    """Check, before any work, that ``path`` may receive a folder of ``kind`` ("model", "run",
    "demo"); returns its state: "new" (absent or empty), "ours" (holds our manifest of that kind).

    Refused with a ValueError: a file; a non-empty folder without our manifest (or with one of
    another kind); a path equal to, inside, or holding one of ``inputs`` (paths the command reads);
    a folder we cannot write."""
    path = Path(os.path.abspath(path))
    for name, source in inputs:
        if source is None or not os.path.exists(source):
            continue
        if is_within(path, source):
            where = "is" if Path(path).resolve() == Path(source).resolve() else "is inside"
            raise ValueError(f"{flag} {str(path)!r} {where} the input {name} {os.fspath(source)!r}; "
                             "writing there would overwrite what is read: choose another folder")
        if is_within(source, path):
            raise ValueError(f"{flag} {str(path)!r} holds the input {name} {os.fspath(source)!r}; "
                             "choose a folder of its own")
    if path.exists() and not path.is_dir():
        raise ValueError(f"{flag} {str(path)!r} is a file, not a folder; choose a folder path")
    state = "new"
    if path.is_dir() and any(not _leftover(p.name) for p in path.iterdir()):
        manifest = read_manifest(path)
        if manifest is None:
            raise ValueError(f"{flag} {str(path)!r} is not empty and was not written by bam (it holds no "
                             f"{MANIFEST}); bam never replaces files it did not write: choose a new folder")
        if manifest["kind"] != kind:
            raise ValueError(f"{flag} {str(path)!r} holds a bam {manifest['kind']} folder, not a {kind} "
                             "folder; choose another folder")
        state = "ours"
    existing = _nearest_existing(path)
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"{flag} {str(path)!r} cannot be written ({str(existing)!r} is not writable "
                         "for this user)")
    return state


def _leftover(name: str) -> bool:
    """Our lock file, or a staging folder a killed write left (both ours by name, neither content)."""
    return name == LOCK or name.startswith(STAGING_PREFIX)


def _chmod_new_folder(path) -> None:
    os.chmod(path, 0o777 & ~umask())


def write_model_folder(path, write) -> None:
    """Write a folder of kind "model": ``write(folder)`` puts the files (no subfolders) into an
    empty staging folder; they become the content of ``path``, with a manifest listing them.

    - ``path`` absent: the staging folder, manifest included, is renamed into place (atomic).
    - ``path`` an empty folder or one of ours: the manifest is first rewritten to list the old and
      the new files as incomplete, the new files renamed in one by one, the old files the new set
      does not hold removed, and the final manifest written last. A crash in between leaves a
      folder that is still ours and that readers refuse as incomplete (``check_complete``).
      Entries the manifest does not list (a user's notes) are never touched.
    """
    path = Path(os.path.abspath(path))
    check_output(path, "model", flag="output path")
    path.parent.mkdir(parents=True, exist_ok=True)
    existing = path.is_dir()
    if existing:
        for stale in path.glob(f"{STAGING_PREFIX}*"):  # what a kill -9 during an earlier write left
            shutil.rmtree(stale, ignore_errors=True)
    stage = Path(tempfile.mkdtemp(dir=path if existing else path.parent,
                                  prefix=STAGING_PREFIX if existing else f".{path.name}.tmp-"))
    try:
        write(stage)
        names = sorted(p.name for p in stage.iterdir())
        if MANIFEST in names:
            raise ValueError(f"a model folder cannot hold a file named {MANIFEST}")
        mode = 0o666 & ~umask()  # safetensors creates its files 0600, whatever the umask
        for name in names:
            if not (stage / name).is_file():
                raise ValueError(f"a model folder holds files only; {name!r} is not one")
            os.chmod(stage / name, mode)
            fsync_file(stage / name)
        files = {name: file_record(stage / name) for name in names}
        if not existing:
            manifest = json.dumps(_manifest("model", files), indent=1) + "\n"
            (stage / MANIFEST).write_text(manifest, encoding="utf-8")
            fsync_file(stage / MANIFEST)
            _chmod_new_folder(stage)
            fsync_dir(stage)
            os.replace(stage, path)
            fsync_dir(path.parent)
            return
        old = read_manifest(path) or {"files": {}}
        union = {**old["files"], **files}
        write_json_atomic(path / MANIFEST, _manifest("model", union, complete=False))
        for name in names:
            if (path / name).is_dir():
                raise ValueError(f"output path {str(path)!r} holds a folder {name!r} where a file goes")
            os.replace(stage / name, path / name)
        for name in old["files"]:
            if name not in files and (path / name).is_file():
                os.remove(path / name)
        fsync_dir(path)
        write_json_atomic(path / MANIFEST, _manifest("model", files))
        stage.rmdir()
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise


def check_complete(folder) -> None:
    """Refuse a folder of ours whose writing was interrupted (its manifest says incomplete)."""
    manifest = read_manifest(folder)
    if manifest is not None and manifest.get("complete") is False:
        raise ValueError(f"{os.fspath(folder)!r} was not completely written (the command writing it was "
                         "interrupted); write it again")


def clear_owned(folder, keep_claim: bool = False) -> None:
    """Remove every entry a folder's manifest lists (a file, or a folder that is ours in turn), then
    the manifest itself, or with ``keep_claim`` a manifest listing nothing, so that the folder stays
    ours. The folder and anything its manifest does not list stay."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    if manifest is None:
        return
    for name in manifest["files"]:
        target = folder / name
        if target.is_symlink() or target.is_file():
            target.unlink()
        elif target.is_dir() and read_manifest(target) is not None:
            clear_owned(target)
            with contextlib.suppress(OSError):
                target.rmdir()
    if keep_claim:
        write_json_atomic(folder / MANIFEST, _manifest(manifest["kind"], {}))
    else:
        (folder / MANIFEST).unlink()


def claim_folder(path, kind: str, entries: list[str]) -> None:
    """Create ``path`` if needed and write the manifest of a folder of ``kind`` whose content we
    manage entry by entry (a run or demo folder): ``entries`` are the names we may write there."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path / MANIFEST, _manifest(kind, dict.fromkeys(entries, {})))


# --- locks -----------------------------------------------------------------------------------------

_held: dict[str, FolderLock] = {}


class FolderLock:
    """An exclusive ``flock`` on ``folder/.bam-lock``, with the holder's pid, host, command and start
    time written into the file so that a second writer can say who holds it. Re-entrant within a
    process (the same folder locked twice gives the same lock)."""

    def __init__(self, folder):
        self.folder = Path(os.path.abspath(folder))
        self.fd: int | None = None
        self.depth = 0

    def acquire(self, what: str = "bam") -> FolderLock:
        key = str(self.folder)
        held = _held.get(key)
        if held is not None:
            held.depth += 1
            return held
        path = self.folder / LOCK
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666 & ~umask())
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            raise ValueError(f"{str(self.folder)!r} is in use by another process ({_holder(path)}); "
                             "wait for it to finish or choose another folder") from None
        holder = {"pid": os.getpid(), "host": socket.gethostname(), "command": what,
                  "argv": sys.argv, "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(holder) + "\n").encode(), 0)
        self.fd, self.depth = fd, 1
        _held[key] = self
        return self

    def release(self) -> None:
        self.depth -= 1
        if self.depth > 0 or self.fd is None:
            return
        _held.pop(str(self.folder), None)
        os.close(self.fd)  # closing the descriptor drops the lock; the file stays (no unlink race)
        self.fd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()


def _holder(path: Path) -> str:
    try:
        h = json.loads(path.read_text(encoding="utf-8"))
        return f"{h['command']}, pid {h['pid']} on {h['host']}, since {h['since']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "holder unknown"


def lock_folder(folder, what: str = "bam") -> FolderLock:
    """Lock ``folder`` (which must exist) for this process; use as a context manager."""
    return FolderLock(folder).acquire(what)


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not a number JSON allows")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text} is out of range for a float")
    return value


def read_json(path: str) -> dict:
    """The JSON object in the file ``path``. Anything else (an unreadable file, not UTF-8, not JSON,
    NaN or Infinity, nesting too deep for Python's parser, an array or a number) is a ValueError
    that names the file."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise ValueError(f"cannot read {path}: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    try:
        value = json.loads(text, parse_constant=_refuse_constant, parse_float=_finite_float)
    except RecursionError:
        raise ValueError(f"{path} is nested too deeply to be read") from None
    except ValueError as e:  # JSONDecodeError, the two refusals above, an int of over 4300 digits
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(value, dict):
        kind = "null" if value is None else type(value).__name__
        raise ValueError(f"{path} must hold a JSON object, got {kind}")
    return value


@contextlib.contextmanager
def about_file(path: str):
    """Prefix the ValueErrors raised inside with ``path``, the file whose contents they are about
    (for checks that know a key, not the file it came from)."""
    try:
        yield
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
