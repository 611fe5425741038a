"""Which folders are ours: ``bam-manifest.json`` (what it lists, reading and writing it), what a
folder of each kind holds, what a killed write leaves, and removing what a manifest lists."""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import time
from importlib import metadata
from pathlib import Path

from .atomic import write_json_atomic
from .locks import LOCK, is_our_lock

MANIFEST = "bam-manifest.json"
MANIFEST_FORMAT = "bam-manifest"
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
# The names of the files ``bam prepare`` writes into a prepared-data folder (bam_model/prepare/).
DATA_FILE_NAMES = re.compile(r"bam-data\.json|(train|heldout)\.(tokens|docs|mask)")
# Moved into a folder last, so that a reader that knows nothing of our manifest (transformers) finds
# no model in a folder whose writing was interrupted.
WRITTEN_LAST = "config.json"
# Per kind of folder written whole (``write_folder``): the names its files may have, and the file
# that makes it loadable, moved in last.
FOLDER_FILES = {"model": (MODEL_FILE_NAMES, WRITTEN_LAST), "data": (DATA_FILE_NAMES, "bam-data.json")}


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
            or not all(isinstance(k, str) and plain_name(k) for k in manifest["files"])):
        return None
    return manifest


def plain_name(name: str) -> bool:
    """A manifest may list only names directly inside its folder."""
    return bool(name) and name not in (".", "..") and "/" not in name and "\0" not in name


def _version() -> str:
    try:
        return metadata.version("bam-moe")
    except metadata.PackageNotFoundError:
        return "unknown"


def new_manifest(kind: str, files: dict, complete: bool = True, **extra) -> dict:
    """The manifest of a folder of ``kind`` whose entries are ``files`` (name -> record)."""
    return {"format": MANIFEST_FORMAT, "kind": kind, "writer": f"bam-moe {_version()}", "complete": complete,
            "written": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **extra, "files": files}


def is_leftover(entry: Path) -> bool:
    """What a folder may hold and still count as empty, each ours by its name and its content: our
    lock file, a staging folder a killed write left (holding our marker, or nothing), a temporary
    of our manifest."""
    if entry.is_symlink():
        return False
    if entry.name == LOCK:
        return is_our_lock(entry)
    if entry.name.startswith(STAGING_PREFIX) and entry.is_dir():
        return (entry / STAGING_MARKER).is_file() or not any(entry.iterdir())
    return entry.name.startswith(f".{MANIFEST}.tmp-") and _manifest_in(entry) is not None


def remove_leftover(entry: Path) -> None:
    """Remove a leftover (``is_leftover``) of a killed write; the lock file stays (its holder removes it)."""
    if entry.name == LOCK:
        return
    if entry.is_dir():
        shutil.rmtree(entry)
    else:
        entry.unlink()


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
        write_json_atomic(folder / MANIFEST, new_manifest(manifest["kind"], {}))
    else:
        (folder / MANIFEST).unlink()


def claim_folder(path, kind: str, entries: list[str]) -> None:
    """Create ``path`` if needed and write the manifest of a folder of ``kind`` whose content we
    manage entry by entry (a run or demo folder): ``entries`` are the names we may write there."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path / MANIFEST, new_manifest(kind, dict.fromkeys(entries, {})))
