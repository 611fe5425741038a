"""Checks before any work: may this path receive a folder of ours, or a results file of ours, without
touching a user's file or an input of the command."""
from __future__ import annotations

import os
from pathlib import Path

from .manifest import FOLDER_FILES, MANIFEST, is_leftover, read_manifest
from .reading import read_own_json
from .room import nearest_existing


def is_within(path, folder) -> bool:
    """Whether ``path`` is ``folder`` or lies inside it (both resolved, symlinks followed)."""
    path, folder = Path(path).resolve(), Path(folder).resolve()
    return path == folder or folder in path.parents


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
    existing = nearest_existing(path if path.is_dir() or not os.path.lexists(path) else path.parent)
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
    if not (path.is_dir() and any(not is_leftover(p) for p in path.iterdir())):
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
                check_target(path, entry.name, manifest["files"], flag)
    return "ours"


def check_target(folder: Path, name: str, listed: dict, flag: str) -> None:
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
