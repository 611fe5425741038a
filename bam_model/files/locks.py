"""Run locks: an exclusive ``flock`` on ``.bam-lock`` inside the folder a command writes, holding the
holder's pid, host and command so that a second writer can say who holds it (released by the kernel
when the process dies: ``kill -9`` never leaves a stale lock)."""
from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import stat
import sys
import time
from pathlib import Path

from .atomic import umask

LOCK = ".bam-lock"
_held: dict[str, FolderLock] = {}
LOCK_MAX_BYTES = 4096       # our holder line is a few hundred bytes


def _holder_record(text: str) -> dict | None:
    try:
        h = json.loads(text)
    except (ValueError, RecursionError):
        return None
    return h if isinstance(h, dict) and {"pid", "host", "command", "since"} <= set(h) else None


def is_our_lock(path: Path) -> bool:
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
