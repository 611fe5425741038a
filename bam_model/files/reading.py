"""Reading JSON files: a user's (``read_json``: every problem a ValueError naming the file) and our
own output files (``read_own_json``: None for anything we did not write)."""
from __future__ import annotations

import contextlib
import json
import math
import os
import stat
from pathlib import Path

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
