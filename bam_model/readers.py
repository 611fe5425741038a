"""Documents from the files a user trains on, one at a time: text files, JSON Lines and JSON
(either optionally gzip-compressed) and Parquet.

- A text file (any name not below; gzip-compressed when it ends in ``.gz``) is one document, read
  as UTF-8 (``text_pieces`` reads it in pieces).
- ``.jsonl`` / ``.jsonl.gz``: one JSON object per line, the document its ``text_field`` (blank lines
  skipped); ``.json`` / ``.json.gz``: a JSON array of such objects.
- ``.parquet``: the column ``text_field``, read a row group at a time by pyarrow (installed with
  the ``data`` extra: ``pip install 'bam-moe[data]'``).

Records whose text is empty are skipped. Anything else is a ValueError naming the file and the line
or row: a line that is not JSON or not an object, a record without the field or whose field is not
a string, bytes that are not UTF-8 (with their offset), a Parquet file without the column.
"""
from __future__ import annotations

import gzip
import json
import os
from collections.abc import Iterator
from pathlib import Path

from .options import short_repr

RECORD_SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".json.gz", ".parquet")
TEXT_FIELD = "text"


def file_format(path: str | os.PathLike) -> str:
    """"jsonl", "json", "parquet" or "text", by the file's name."""
    name = os.fspath(path).lower()
    for suffix, kind in ((".jsonl", "jsonl"), (".jsonl.gz", "jsonl"), (".json", "json"), (".json.gz", "json"),
                         (".parquet", "parquet")):
        if name.endswith(suffix):
            return kind
    return "text"


def read_documents(path: str | os.PathLike, text_field: str = TEXT_FIELD) -> Iterator[str]:
    """The documents of the file ``path`` in file order (see the module doc), streamed: memory holds
    one record (one row group for Parquet) at a time."""
    path = Path(path)
    kind = file_format(path)
    if kind == "text":
        yield _read_text(path)
    elif kind == "jsonl":
        yield from _jsonl_documents(path, text_field)
    elif kind == "json":
        yield from _json_documents(path, text_field)
    else:
        yield from _parquet_documents(path, text_field)


TEXT_PIECE = 256 << 10


def text_pieces(path: str | os.PathLike, piece: int = TEXT_PIECE) -> Iterator[tuple[str, bool, int]]:
    """A text file (gzip-compressed when its name ends in ``.gz``), the one document it is, in pieces
    of about ``piece`` bytes cut after a line break (a line longer than that is cut at a character
    boundary): ``(text, is the last piece, bytes of the file read for it)``. Memory holds one piece.
    Bytes that are not UTF-8 are a ValueError naming the file and the offset."""
    path = Path(path)
    offset, carry = 0, b""
    try:
        with _open_text(path) as f:
            while True:
                block = f.read(piece)
                data = carry + block
                if not block:
                    if data or offset:     # the end of a document begun (an empty file holds none)
                        yield _decode(data, path, offset), True, len(data)
                    return
                cut = data.rfind(b"\n") + 1
                if cut == 0 and len(data) >= 4 * piece:          # one long line: cut at a character start
                    cut = len(data) - 3
                    while cut > 1 and (data[cut] & 0xC0) == 0x80:   # a continuation byte: not a start
                        cut -= 1
                if cut == 0:
                    carry = data
                    continue
                text = _decode(data[:cut], path, offset)
                offset += cut
                carry = data[cut:]
                yield text, False, cut
    except (gzip.BadGzipFile, EOFError) as e:
        raise ValueError(f"data: {str(path)!r} is not a complete gzip file ({e})") from None


def _decode(data: bytes, path: Path, offset: int) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"data: {str(path)!r} is not UTF-8 text (byte {offset + e.start}: "
                         f"{e.reason})") from None


def _read_text(path: Path) -> str:
    return "".join(text for text, _, _ in text_pieces(path))


def _open_text(path: Path):
    return gzip.open(path, "rb") if path.name.lower().endswith(".gz") else open(path, "rb")


def _document(record, text_field: str, where: str) -> str:
    if not isinstance(record, dict):
        raise ValueError(f"data: {where} is not a JSON object, got {short_repr(record)}")
    if text_field not in record:
        keys = ", ".join(map(repr, list(record)[:8])) or "none"
        raise ValueError(f"data: {where} has no {text_field!r} field (its keys: {keys})")
    text = record[text_field]
    if not isinstance(text, str):
        raise ValueError(f"data: {where}: {text_field!r} must be a string, got {short_repr(text)}")
    return text


def _jsonl_documents(path: Path, text_field: str) -> Iterator[str]:
    try:
        with _open_text(path) as f:
            for n, raw in enumerate(f, 1):
                where = f"{str(path)!r} line {n}"
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise ValueError(f"data: {where} is not UTF-8 (byte {e.start} of the line: "
                                     f"{e.reason})") from None
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except (ValueError, RecursionError) as e:
                    raise ValueError(f"data: {where} is not JSON ({str(e).splitlines()[0][:100]})") from None
                text = _document(record, text_field, where)
                if text:
                    yield text
    except (gzip.BadGzipFile, EOFError) as e:
        raise ValueError(f"data: {str(path)!r} is not a complete gzip file ({e})") from None


def _json_documents(path: Path, text_field: str) -> Iterator[str]:
    try:
        with _open_text(path) as f:
            raw = f.read()
    except (gzip.BadGzipFile, EOFError) as e:
        raise ValueError(f"data: {str(path)!r} is not a complete gzip file ({e})") from None
    try:
        records = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ValueError(f"data: {str(path)!r} is not UTF-8 (byte {e.start}: {e.reason})") from None
    except (ValueError, RecursionError) as e:
        raise ValueError(f"data: {str(path)!r} is not JSON ({str(e).splitlines()[0][:100]})") from None
    if not isinstance(records, list):
        raise ValueError(f"data: {str(path)!r} must hold a JSON array of objects (or use .jsonl, one object "
                         f"a line), got {type(records).__name__}")
    for i, record in enumerate(records):
        text = _document(record, text_field, f"{str(path)!r} record {i}")
        if text:
            yield text


def _parquet_documents(path: Path, text_field: str) -> Iterator[str]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ValueError(f"data: reading {str(path)!r} needs pyarrow: pip install 'bam-moe[data]' (or "
                         "pyarrow)") from None
    try:
        parquet = pq.ParquetFile(path)
    except Exception as e:   # pyarrow's ArrowInvalid and kin: the file is not Parquet, or cut short
        raise ValueError(f"data: {str(path)!r} is not a readable Parquet file ({str(e)[:200]})") from None
    columns = parquet.schema_arrow.names
    if text_field not in columns:
        raise ValueError(f"data: {str(path)!r} has no column {text_field!r} (its columns: "
                         f"{', '.join(map(repr, columns[:8]))})")
    row = 0
    for batch in parquet.iter_batches(columns=[text_field]):
        for text in batch.column(0).to_pylist():
            if not isinstance(text, str) and text is not None:
                raise ValueError(f"data: {str(path)!r} row {row}: {text_field!r} must be a string, got "
                                 f"{short_repr(text)}")
            row += 1
            if text:
                yield text
