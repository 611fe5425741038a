"""Writing one file safely: under a temporary name beside its target, fsynced and renamed into place
(a crash leaves the old file or the new one, never half of one), and the hashes manifests record."""
from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile

from safetensors import SafetensorError
from safetensors.torch import save_file


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


def write_json_atomic(path, obj, allow_nan: bool = False) -> None:
    """``obj`` as indented JSON, atomically. ``allow_nan``: write inf and NaN as JavaScript does
    (``Infinity``, ``NaN``; Python's json reads them back), for results where they are values (the
    perplexity of a diverged model); otherwise they are refused."""
    write_text_atomic(path, json.dumps(obj, indent=2, allow_nan=allow_nan) + "\n")
