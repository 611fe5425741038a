"""Writing a folder: holding it for a command (created, locked, removed again when the command fails
before writing there) and writing a model or data folder whole, through a staging folder inside it."""
from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from pathlib import Path

from .atomic import file_record, fsync_dir, fsync_file, umask, write_json_atomic
from .checks import check_output, check_target
from .locks import LOCK, FolderLock, lock_folder
from .manifest import (
    FOLDER_FILES,
    MANIFEST,
    STAGING_MARKER,
    STAGING_PREFIX,
    is_leftover,
    new_manifest,
    read_manifest,
    remove_leftover,
)


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
    innermost one's, held by the caller) what a killed write left there (``is_leftover``) goes first,
    then the lock file, then the folder; without it, and in the parents, nothing but empty folders
    is touched (another writer may be at work there)."""
    for i, p in enumerate(reversed(made)):
        try:
            if i == 0 and lock is not None:
                entries = list(p.iterdir())
                if not all(is_leftover(e) for e in entries):
                    return
                for e in entries:
                    remove_leftover(e)
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
    path = Path(os.path.abspath(path))
    with reserve_output(path, kind, flag=flag):
        for stale in list(path.iterdir()):   # what a kill -9 during an earlier write left (we hold the lock)
            if is_leftover(stale):
                remove_leftover(stale)
        stage = Path(tempfile.mkdtemp(dir=path, prefix=STAGING_PREFIX))
        (stage / STAGING_MARKER).touch()
        try:
            names = _write_staged(stage, write, path, kind)
            old = read_manifest(path)
            listed = old["files"] if old is not None else {}
            for name in names:
                check_target(path, name, listed, flag)
            files = {name: (records or {}).get(name) or file_record(stage / name) for name in names}
            _move_in(stage, path, kind, files, listed)
        finally:
            shutil.rmtree(stage, ignore_errors=True)


def _write_staged(stage: Path, write, path: Path, kind: str) -> list[str]:
    """Run ``write(stage)`` and check what it wrote: plain files of names a ``kind`` folder may hold,
    none of bam's own; each is given the umask's mode and fsynced. Returns their names, sorted."""
    names_allowed = FOLDER_FILES[kind][0]
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
    return names


def _move_in(stage: Path, path: Path, kind: str, files: dict, listed: dict) -> None:
    """Make the staged ``files`` (name -> record) the content of ``path``, whose manifest lists
    ``listed``: the manifest first (old and new, incomplete), the new files, the old ones removed,
    the file that makes the folder loadable, the final manifest last."""
    last = FOLDER_FILES[kind][1]
    write_json_atomic(path / MANIFEST, new_manifest(kind, {**listed, **files}, complete=False))
    for name in files:
        if name != last:
            os.replace(stage / name, path / name)
    for name in listed:       # before the last file: never a new config beside old weights
        target = path / name
        if name not in files and (target.is_symlink() or target.is_file()):
            target.unlink()
    if last in files:
        os.replace(stage / last, path / last)
    fsync_dir(path)
    write_json_atomic(path / MANIFEST, new_manifest(kind, files))
    fsync_dir(path)
