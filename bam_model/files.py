"""The file system, safely: atomic writes, fsync, hashes, which folders are ours, and run locks.

Rules every writer of the package follows (see docs/reliability.md):

- A file is written under a temporary name beside its target, fsynced and renamed into place, so a
  crash leaves the old file or the new one, never half of one. New files and folders get the mode
  the user's umask gives (as ``cp`` would); a replaced file keeps its mode.
- A folder is ours only when it holds ``bam-manifest.json``, written by us, which lists the entries
  we wrote. An existing folder is written into only when it is empty or ours; inside it only the
  entries the manifest lists are replaced or removed. Anything else is refused before work starts.
- Every writer of a folder (a model, a run, a demo) locks it for the whole command (``fcntl.flock``
  on ``.bam-lock`` inside it: released by the kernel when the process dies, so ``kill -9`` never
  leaves a stale lock); a second writer fails at once with a message naming the holder. The lock
  file is never opened through a link, and a folder that did not exist is created to hold it (and
  removed again when the command fails before writing anything there).
- An output *file* (``bam eval --json``) is ours when it holds our format marker; a file without
  it is never replaced.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import math
import os
import re
import shutil
import socket
import stat
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import save_file

MANIFEST = "bam-manifest.json"
MANIFEST_FORMAT = "bam-manifest"
LOCK = ".bam-lock"
KINDS = ("model", "run", "demo", "data")
STAGING_PREFIX = ".bam-staging-"
# Written into every staging folder as it is made: a folder of that prefix is ours to remove only when
# it holds this marker (or nothing), never by its name alone.
STAGING_MARKER = ".bam-staging"
# The names of the files bam's commands write into a model folder: a user's file of such a name that
# our manifest does not list is found before any work (``check_output``).
MODEL_FILE_NAMES = re.compile(
    r"config\.json|tokenizer\.json|tokenizer_config\.json|configuration_bam\.py|modeling_bam\.py|mix\.yaml"
    r"|model(-\d{5}-of-\d{5})?\.safetensors|model\.safetensors\.index\.json")
# The names of the files ``bam prepare`` writes into a prepared-data folder (bam_model/prepare.py).
DATA_FILE_NAMES = re.compile(r"bam-data\.json|(train|heldout)\.(tokens|docs|mask)")
# Moved into a folder last, so that a reader that knows nothing of our manifest (transformers) finds
# no model in a folder whose writing was interrupted.
WRITTEN_LAST = "config.json"
# Per kind of folder written whole (``write_folder``): the names its files may have, and the file
# that makes it loadable, moved in last.
FOLDER_FILES = {"model": (MODEL_FILE_NAMES, WRITTEN_LAST), "data": (DATA_FILE_NAMES, "bam-data.json")}


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


def save_safetensors(tensors: dict, path, metadata: dict | None = None) -> None:
    """``safetensors.torch.save_file``, whose I/O failures (a full disk) become the ``OSError`` they
    are (safetensors reports them as a ``SafetensorError`` carrying "os error N" in its text)."""

    try:
        save_file(tensors, os.fspath(path), metadata=metadata)
    except SafetensorError as e:
        code = re.search(r"\(os error (\d+)\)", str(e))
        if code is None:
            raise
        raise OSError(int(code.group(1)), os.strerror(int(code.group(1))), os.fspath(path)) from None


def write_text_atomic(path, text: str) -> None:
    """``write_atomic`` of a UTF-8 text."""
    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
    write_atomic(path, write)


def write_json_atomic(path, obj) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, allow_nan=False) + "\n")


# --- room ----------------------------------------------------------------------------------------

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
    free = shutil.disk_usage(_nearest_existing(Path(os.path.abspath(path)))).free
    if nbytes > free:
        raise ValueError(f"{what} takes {gib(nbytes)}, more than the {gib(free)} free on the disk of "
                         f"{os.fspath(path)!r}; free some space or write elsewhere")


# --- ownership -------------------------------------------------------------------------------------

def read_manifest(folder) -> dict | None:
    """The manifest of a folder we wrote, or None when there is none (or it is not ours)."""
    return _manifest_in(Path(folder) / MANIFEST)


def _manifest_in(path: Path) -> dict | None:
    """The manifest the file ``path`` holds, or None when it holds none of ours."""
    if path.is_symlink() or not path.is_file():
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
    try:
        return metadata.version("bam-moe")
    except metadata.PackageNotFoundError:
        return "unknown"


def _manifest(kind: str, files: dict, complete: bool = True, **extra) -> dict:
    return {"format": MANIFEST_FORMAT, "kind": kind, "writer": f"bam-moe {_version()}", "complete": complete,
            "written": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **extra, "files": files}


def _nearest_existing(path: Path) -> Path:
    while not os.path.lexists(path) and path != path.parent:
        path = path.parent
    return path


def _check_inputs(path: Path, inputs, flag: str) -> None:
    for name, source in inputs:
        if source is None or not os.path.exists(source):
            continue
        if is_within(path, source):
            where = "is" if Path(path).resolve() == Path(source).resolve() else "is inside"
            raise ValueError(f"{flag} {str(path)!r} {where} the input {name} {os.fspath(source)!r}; "
                             "writing there would overwrite what is read: choose another path")
        if is_within(source, path):
            raise ValueError(f"{flag} {str(path)!r} holds the input {name} {os.fspath(source)!r}; "
                             "choose a folder of its own")


def _check_writable(path: Path, flag: str) -> None:
    if os.path.islink(path) and not path.exists():
        raise ValueError(f"{flag} {str(path)!r} is a symbolic link to {os.readlink(path)!r}, which does not "
                         "exist; give a path that exists or none at all")
    # A file is replaced by a rename: its folder must be writable, whatever the file's own mode.
    existing = _nearest_existing(path if path.is_dir() or not os.path.lexists(path) else path.parent)
    if existing != path and not existing.is_dir():
        raise ValueError(f"{flag} {str(path)!r} cannot be made: {str(existing)!r} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"{flag} {str(path)!r} cannot be written ({str(existing)!r} is not writable "
                         "for this user)")


def check_output(path, kind: str, *, flag: str = "--out", inputs=()) -> str:
    """Check, before any work, that ``path`` may receive a folder of ``kind`` ("model", "run",
    "demo"); returns its state: "new" (absent or empty), "ours" (holds our manifest of that kind).

    Refused with a ValueError: a file; a link to nothing; a non-empty folder without our manifest (or
    with one of another kind); in a model folder of ours, a file bam writes there (``MODEL_FILE_NAMES``)
    that the manifest does not list, or a folder of such a name; a path equal to, inside, or holding
    one of ``inputs`` (paths the command reads); a folder we cannot write."""
    path = Path(os.path.abspath(path))
    _check_inputs(path, inputs, flag)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{flag} {str(path)!r} is a file, not a folder; choose a folder path")
    _check_writable(path, flag)
    if not (path.is_dir() and any(not _leftover(p) for p in path.iterdir())):
        return "new"
    manifest = read_manifest(path)
    if manifest is None:
        raise ValueError(f"{flag} {str(path)!r} is not empty and was not written by bam (it holds no "
                         f"{MANIFEST}); bam never replaces files it did not write: choose a new folder")
    if manifest["kind"] != kind:
        raise ValueError(f"{flag} {str(path)!r} holds a bam {manifest['kind']} folder, not a {kind} "
                         "folder; choose another folder")
    if kind in FOLDER_FILES:
        for entry in sorted(path.iterdir()):
            if FOLDER_FILES[kind][0].fullmatch(entry.name):
                _check_target(path, entry.name, manifest["files"], flag)
    return "ours"


def _check_target(folder: Path, name: str, listed: dict, flag: str) -> None:
    """Refuse to write the file ``name`` into our folder ``folder`` when a folder, or an entry the
    manifest does not list (a user's own file), has that name."""
    target = folder / name
    if not os.path.lexists(target):
        return
    if target.is_dir() and not target.is_symlink():
        raise ValueError(f"{flag} {str(folder)!r} holds a folder {name!r} where bam writes a file; move it "
                         "away or choose another folder")
    if name not in listed:
        raise ValueError(f"{flag} {str(folder)!r} holds {name!r}, which bam did not write (its {MANIFEST} "
                         "does not list it) and may write there; move it away or choose another folder")


def _leftover(entry: Path) -> bool:
    """What a folder may hold and still count as empty, each ours by its name and its content: our
    lock file, a staging folder a killed write left (holding our marker, or nothing), a temporary
    of our manifest."""
    if entry.is_symlink():
        return False
    if entry.name == LOCK:
        return _is_our_lock(entry)
    if entry.name.startswith(STAGING_PREFIX) and entry.is_dir():
        return (entry / STAGING_MARKER).is_file() or not any(entry.iterdir())
    return entry.name.startswith(f".{MANIFEST}.tmp-") and _manifest_in(entry) is not None


def _remove_leftover(entry: Path) -> None:
    """Remove a leftover (``_leftover``) of a killed write; the lock file stays (its holder removes it)."""
    if entry.name == LOCK:
        return
    if entry.is_dir():
        shutil.rmtree(entry)
    else:
        entry.unlink()


def make_folder(path: Path) -> list[Path]:
    """Create ``path`` and any missing parents (modes as the umask gives); returns those created,
    innermost last."""
    missing = []
    p = path
    while not os.path.lexists(p) and p != p.parent:
        missing.append(p)
        p = p.parent
    made = []
    for p in reversed(missing):
        try:
            os.mkdir(p)
        except FileExistsError:
            continue
        made.append(p)
    return made


def remove_if_unused(made: list[Path], lock: FolderLock | None = None) -> None:
    """Remove the folders ``made`` (innermost last) again when they are empty. With ``lock`` (the
    innermost one's, held by the caller) what a killed write left there (``_leftover``) goes first,
    then the lock file, then the folder; without it, and in the parents, nothing but empty folders
    is touched (another writer may be at work there)."""
    for i, p in enumerate(reversed(made)):
        try:
            if i == 0 and lock is not None:
                entries = list(p.iterdir())
                if not all(_leftover(e) for e in entries):
                    return
                for e in entries:
                    _remove_leftover(e)
                lock.remove_file()
            p.rmdir()
        except OSError:
            return


@contextlib.contextmanager
def reserve_output(path, kind: str, *, flag: str = "--out", inputs=(), what: str = "bam"):
    """Hold the output folder ``path`` for the block: checked (``check_output``) before any work,
    created when absent, locked for this process (a second writer fails at once, naming this one),
    then checked again under the lock; yields its state ("new" or "ours"). When the block fails, a
    folder created here that holds nothing else is removed again (with the parents made for it).
    Re-entrant: a writer inside the block (``write_model_folder``) shares the lock."""
    path = Path(os.path.abspath(path))
    check_output(path, kind, flag=flag, inputs=inputs)
    made = make_folder(path)
    try:
        lock = lock_folder(path, what)
    except BaseException:
        remove_if_unused(made)
        raise
    try:
        yield check_output(path, kind, flag=flag, inputs=inputs)
    except BaseException:
        if made:
            remove_if_unused(made, lock)
        raise
    finally:
        lock.release()


def write_model_folder(path, write) -> None:
    """``write_folder`` of a model folder."""
    write_folder(path, write, "model")


def write_folder(path, write, kind: str, *, flag: str = "output path", records: dict | None = None) -> None:
    """Write a folder of ``kind`` ("model" or "data"): ``write(folder)`` puts the files (no
    subfolders; names that ``FOLDER_FILES[kind]`` allows) into an empty staging folder; they become
    the content of ``path``, with a manifest listing them.

    The folder is held (``reserve_output``: created when absent, locked) while it is written; the
    staging folder lies inside it, so a killed write leaves nothing beside it, and the next write
    removes what it left. Every name is checked against what the folder holds before anything is
    moved (a user's file of that name, a folder where a file goes: refused, the folder untouched).
    Then the manifest is written listing the old and the new files as incomplete, the new files
    renamed in one by one (the file that makes the folder loadable, ``config.json`` or
    ``bam-data.json``, last), the old files the new set does not hold removed, and the final
    manifest written last. A crash in between leaves a folder that is still ours and
    that readers refuse as incomplete (``check_complete``); one before leaves the folder as it was.
    Entries the manifest does not list (a user's notes) are never touched. ``records``: the
    manifest's records (``file_record``) of files whose hashes the writer already has.
    """
    names_allowed, last = FOLDER_FILES[kind]
    path = Path(os.path.abspath(path))
    with reserve_output(path, kind, flag=flag):
        for stale in list(path.iterdir()):   # what a kill -9 during an earlier write left (we hold the lock)
            if _leftover(stale):
                _remove_leftover(stale)
        stage = Path(tempfile.mkdtemp(dir=path, prefix=STAGING_PREFIX))
        (stage / STAGING_MARKER).touch()
        try:
            try:
                write(stage)
            except OSError as e:   # a full disk, a quota: named by the folder, not our staging name
                if e.errno not in (errno.ENOSPC, errno.EDQUOT):
                    raise
                raise OSError(e.errno, e.strerror, str(path)) from None
            names = sorted(p.name for p in stage.iterdir() if p.name != STAGING_MARKER)
            mode = 0o666 & ~umask()  # safetensors creates its files 0600, whatever the umask
            for name in names:
                if name in (MANIFEST, LOCK) or name.startswith(STAGING_PREFIX):
                    raise ValueError(f"a {kind} folder cannot hold a file named {name!r} (bam's own)")
                if kind != "model" and not names_allowed.fullmatch(name):   # a model's: checked by name below
                    raise ValueError(f"a {kind} folder holds no file named {name!r}")
                if (stage / name).is_symlink() or not (stage / name).is_file():
                    raise ValueError(f"a {kind} folder holds files only; {name!r} is not one")
                os.chmod(stage / name, mode)
                fsync_file(stage / name)
            old = read_manifest(path)
            listed = old["files"] if old is not None else {}
            for name in names:
                _check_target(path, name, listed, flag)
            files = {name: (records or {}).get(name) or file_record(stage / name) for name in names}
            write_json_atomic(path / MANIFEST, _manifest(kind, {**listed, **files}, complete=False))
            for name in names:
                if name != last:
                    os.replace(stage / name, path / name)
            for name in listed:       # before the last file: never a new config beside old weights
                target = path / name
                if name not in files and (target.is_symlink() or target.is_file()):
                    target.unlink()
            if last in names:
                os.replace(stage / last, path / last)
            fsync_dir(path)
            write_json_atomic(path / MANIFEST, _manifest(kind, files))
            fsync_dir(path)
        finally:
            shutil.rmtree(stage, ignore_errors=True)


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


# --- output files ----------------------------------------------------------------------------------

OUTPUT_FILE_MAX_BYTES = 64 << 20   # a results file of ours is far smaller: a larger one is not read


def read_own_json(path, is_ours) -> dict | None:
    """The JSON object of the file ``path`` when ``is_ours(object)`` says we wrote it, else None (also
    for a link, a file that is not JSON, or one larger than any we write)."""
    try:
        st = os.lstat(path)
        if not stat.S_ISREG(st.st_mode) or st.st_size > OUTPUT_FILE_MAX_BYTES:
            return None
        value = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):
        return None
    return value if isinstance(value, dict) and is_ours(value) else None


def check_output_file(path, is_ours, *, flag: str, what: str, inputs=()) -> None:
    """Check, before any work, that the file ``path`` may receive a JSON file of ours: absent, or a
    JSON object ``is_ours`` accepts (one we wrote: it is replaced). Refused with a ValueError naming
    ``flag``: a folder, a link, any other file (``what`` names the kind of file we write), a path that
    is, is inside or holds one of ``inputs``, a place we cannot write."""
    path = Path(os.path.abspath(path))
    if path.is_dir():
        raise ValueError(f"{flag} {str(path)!r} is a folder; give a file path such as "
                         f"{os.path.join(path, 'results.json')!r}")
    _check_inputs(path, inputs, flag)
    _check_writable(path, flag)
    if os.path.lexists(path) and read_own_json(path, is_ours) is None:
        raise ValueError(f"{flag} {str(path)!r} exists and is not {what} written by bam; bam never replaces "
                         "files it did not write: choose another file name")


# --- locks -----------------------------------------------------------------------------------------

_held: dict[str, FolderLock] = {}
LOCK_MAX_BYTES = 4096       # our holder line is a few hundred bytes


def _holder_record(text: str) -> dict | None:
    try:
        h = json.loads(text)
    except (ValueError, RecursionError):
        return None
    return h if isinstance(h, dict) and {"pid", "host", "command", "since"} <= set(h) else None


def _is_our_lock(path: Path) -> bool:
    """A plain file of one name (no link, no hard link to another file), empty or holding our holder
    line (``_check_lock_file``): ours to lock, rewrite and remove."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        _check_lock_file(fd, path)
        return True
    except (ValueError, OSError):
        return False
    finally:
        os.close(fd)


def _check_lock_file(fd: int, path: Path, content: bool = True) -> None:
    """Refuse a lock file that is not a plain file of one name, or (``content``) that holds anything
    but our holder line."""
    st = os.fstat(fd)
    text = os.pread(fd, LOCK_MAX_BYTES + 1, 0) if content and stat.S_ISREG(st.st_mode) else b""
    if (not stat.S_ISREG(st.st_mode) or st.st_nlink != 1 or st.st_size > LOCK_MAX_BYTES
            or (text and _holder_record(text.decode("utf-8", "replace")) is None)):
        raise ValueError(f"{str(path)!r} is not bam's lock file (bam writes there only a plain file of its "
                         "own); move it away or choose another folder")


class FolderLock:
    """An exclusive ``flock`` on ``folder/.bam-lock``, with the holder's pid, host, command and start
    time written into the file so that a second writer can say who holds it. Re-entrant within a
    process (the same folder locked twice gives the same lock). The file is never opened through a
    link and never when it holds anything but our holder line; it is removed on release."""

    ATTEMPTS = 5    # a holder that releases between our open and our flock removes the file: open anew

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
        for _ in range(self.ATTEMPTS):
            fd = self._open(path)
            try:
                if os.fstat(fd).st_nlink == 0:    # its holder removed it as we opened it: open anew
                    os.close(fd)
                    continue
                _check_lock_file(fd, path, content=False)
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                if not _same_file(fd, path):      # released and removed before our flock: open anew
                    os.close(fd)
                    continue
                _check_lock_file(fd, path)        # its content is stable once we hold it
            except OSError as e:
                os.close(fd)
                if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise
                raise ValueError(f"{str(self.folder)!r} is in use by another process ({_holder(path)}); "
                                 "wait for it to finish or choose another folder") from None
            except BaseException:
                os.close(fd)
                raise
            break
        else:
            raise ValueError(f"{str(self.folder)!r} is being locked and released by other processes; "
                             "try again")
        holder = {"pid": os.getpid(), "host": socket.gethostname()[:200], "command": what[:200],
                  "since": time.strftime("%Y-%m-%d %H:%M:%S"), "argv": [a[:200] for a in sys.argv[:8]]}
        line = json.dumps(holder) + "\n"
        if len(line.encode()) > LOCK_MAX_BYTES:   # whole or without argv: always a record we can read
            line = json.dumps({k: v for k, v in holder.items() if k != "argv"}) + "\n"
        os.ftruncate(fd, 0)
        os.pwrite(fd, line.encode(), 0)
        self.fd, self.depth = fd, 1
        _held[key] = self
        return self

    @staticmethod
    def _open(path: Path) -> int:
        try:
            return os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666 & ~umask())
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise ValueError(f"{str(path)!r} is a symbolic link; bam never opens its lock file through a "
                                 "link (it would write where the link points): remove it") from None
            if e.errno == errno.ENOENT:
                raise ValueError(f"{str(path.parent)!r} was removed by another process while this one "
                                 "waited for it; run again") from None
            raise

    def remove_file(self) -> None:
        """Remove the lock file while still holding it: a process waiting on it sees it gone and opens
        a new one (or finds the folder gone)."""
        with contextlib.suppress(OSError):
            if self.fd is not None and _same_file(self.fd, self.folder / LOCK):
                os.unlink(self.folder / LOCK)

    def release(self) -> None:
        self.depth -= 1
        if self.depth > 0 or self.fd is None:
            return
        _held.pop(str(self.folder), None)
        self.remove_file()
        os.close(self.fd)
        self.fd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()


def _same_file(fd: int, path: Path) -> bool:
    try:
        a, b = os.fstat(fd), os.lstat(path)
    except OSError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _holder(path: Path) -> str:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            h = _holder_record(os.read(fd, LOCK_MAX_BYTES).decode("utf-8", "replace"))
        finally:
            os.close(fd)
    except OSError:
        h = None
    return f"{h['command']}, pid {h['pid']} on {h['host']}, since {h['since']}" if h else "holder unknown"


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
