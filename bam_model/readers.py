"""Documents from the files a user trains on, one at a time: text files, JSON Lines and JSON
(each optionally compressed: ``.gz``, or ``.zst`` with the zstandard package), Parquet and Arrow.

- A text file (any name not below) is one document, read as UTF-8 (``text_pieces`` reads it in
  pieces).
- ``.jsonl``: one JSON object per line, the document its ``text_field`` (blank lines skipped);
  ``.json``: a JSON array of such objects.
- ``.parquet``: the column ``text_field``, read a row group at a time; ``.arrow`` (the files of a
  Hugging Face ``datasets`` folder): a record batch at a time. Both by pyarrow (installed, with
  zstandard, by the ``data`` extra: ``pip install 'bam-moe[data]'``).

A record without the text field that holds ``messages`` (a list of ``{"role", "content"}``) is a
conversation, yielded as that list (``chat`` renders it). Records whose text is empty are skipped.
Anything else is a ValueError naming the file and the line or row: a line that is not JSON or not an
object, a record without the field or whose field is not a string, bytes that are not UTF-8 (with
their offset), a Parquet file without the column.
"""
from __future__ import annotations

import gzip
import io
import json
import os
from collections.abc import Iterator
from pathlib import Path

from .chat import ROLES_FIELD as MESSAGES
from .chat import check_messages
from .options import short_repr

TEXT_FIELD = "text"
COMPRESSIONS = (".gz", ".zst")
FORMATS = {".jsonl": "jsonl", ".json": "json", ".parquet": "parquet", ".arrow": "arrow"}


def file_format(path: str | os.PathLike) -> str:
    """"jsonl", "json", "parquet", "arrow" or "text", by the file's name (``.gz`` and ``.zst``
    compression of jsonl, json and text files aside)."""
    name = os.fspath(path).lower()
    for ext in COMPRESSIONS:
        if name.endswith(ext):
            name = name[:-len(ext)]
            return {".jsonl": "jsonl", ".json": "json"}.get(os.path.splitext(name)[1], "text")
    return FORMATS.get(os.path.splitext(name)[1], "text")


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
    elif kind == "arrow":
        yield from _arrow_documents(path, text_field)
    else:
        yield from _parquet_documents(path, text_field)


# A text file is tokenized whole up to this size; a larger one in pieces of about this size, cut
# where the tokenizer's pre-tokenization does not join across the cut (see ``text_pieces``).
TEXT_PIECE = 8 << 20
_SPACE = frozenset(b" \t\n\r\x0b\x0c")


def _safe_cut(data: bytes) -> int:
    """Where to cut ``data``: just after the last line break that has a non-space byte on both sides
    (byte-level BPE and similar pre-tokenizers split there anyway, so the pieces' tokens are the
    whole text's); else after the last line break; else at the last character start; 0: nowhere."""
    i = data.rfind(b"\n", 0, len(data) - 1)
    while i > 0:
        if data[i - 1] not in _SPACE and data[i + 1] not in _SPACE:
            return i + 1
        i = data.rfind(b"\n", 0, i)
    return data.rfind(b"\n") + 1


def text_pieces(path: str | os.PathLike, piece: int | None = None) -> Iterator[tuple[str, bool, int]]:
    """A text file (compressed when its name ends in ``.gz`` or ``.zst``), the one document it is:
    whole when it holds less than twice ``piece`` bytes (``TEXT_PIECE``: 16 MiB), else in pieces of
    one to two ``piece`` cut by ``_safe_cut`` (a line longer than four pieces at a character start):
    ``(text, is the last piece, bytes of the file read for it)``. Memory holds one piece. Bytes that
    are not UTF-8 are a ValueError naming the file and the offset."""
    path = Path(path)
    piece = piece or TEXT_PIECE
    offset, data = 0, b""
    try:
        with _open_text(path) as f:
            while True:
                block = f.read(piece)
                data += block
                if not block:
                    if data or offset:     # the end of a document begun (an empty file holds none)
                        yield _decode(data, path, offset), True, len(data)
                    return
                if len(data) < 2 * piece:   # read on: the rest may fit the last piece
                    continue
                cut = _safe_cut(data[:len(data) - piece // 2])   # the cut leaves the next piece a start
                if cut == 0:
                    if len(data) < 4 * piece:
                        continue
                    cut = len(data) - 3                   # one long line: cut at a character start
                    while cut > 1 and (data[cut] & 0xC0) == 0x80:   # a continuation byte: not a start
                        cut -= 1
                text = _decode(data[:cut], path, offset)
                offset += cut
                data = data[cut:]
                yield text, False, cut
    except (gzip.BadGzipFile, EOFError, *_zstd_errors()) as e:
        raise ValueError(f"data: {str(path)!r} is not a complete {_compression(path)} file ({e})") from None


def _decode(data: bytes, path: Path, offset: int) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"data: {str(path)!r} is not UTF-8 text (byte {offset + e.start}: "
                         f"{e.reason})") from None


def _read_text(path: Path) -> str:
    return "".join(text for text, _, _ in text_pieces(path))


def _open_text(path: Path):
    """The file's bytes, decompressed by its name (``.gz``: gzip; ``.zst``: Zstandard, which needs
    the zstandard package, installed with the data extra)."""
    name = path.name.lower()
    if name.endswith(".gz"):
        return gzip.open(path, "rb")
    if name.endswith(".zst"):
        try:
            import zstandard  # noqa: PLC0415 (optional: the data extra)
        except ImportError:
            raise ValueError(f"data: reading {str(path)!r} needs zstandard: pip install 'bam-moe[data]' (or "
                             "zstandard)") from None
        return io.BufferedReader(_ZstdStream(open(path, "rb"), zstandard), buffer_size=1 << 20)
    return open(path, "rb")


class _ZstdStream(io.RawIOBase):
    """A Zstandard file's content, decompressed as it is read; a file that ends inside a frame is an
    EOFError (as gzip's), not a silently shorter text."""

    # Compressed bytes fed at a time: what one call returns stays small (text compresses 3-10x; a
    # block of one repeated byte, up to ~32,000x: 128 MiB at most).
    FEED = 4096

    def __init__(self, raw, zstandard):
        self.raw, self.zstandard = raw, zstandard
        self.dobj = zstandard.ZstdDecompressor().decompressobj()
        self.pending, self.at = b"", 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while self.at == len(self.pending):
            chunk = self.raw.read(self.FEED)
            if not chunk:
                if not self.dobj.eof:
                    raise EOFError("the file ended before the end of its Zstandard frame")
                return 0
            out = []
            while chunk:
                if self.dobj.eof:       # a next frame: files of concatenated frames are common
                    self.dobj = self.zstandard.ZstdDecompressor().decompressobj()
                out.append(self.dobj.decompress(chunk))
                chunk = self.dobj.unused_data if self.dobj.eof else b""
            self.pending, self.at = b"".join(out), 0
        n = min(len(buffer), len(self.pending) - self.at)
        buffer[:n] = memoryview(self.pending)[self.at:self.at + n]
        self.at += n
        return n

    def close(self) -> None:
        self.raw.close()
        super().close()


class Conversation(list):
    """A record's messages, with where the record is (file and line or row) for messages about it."""

    def __init__(self, messages: list, where: str):
        super().__init__(messages)
        self.where = where


def _zstd_errors() -> tuple:
    try:
        import zstandard  # noqa: PLC0415 (optional: the data extra)
    except ImportError:
        return ()
    return (zstandard.ZstdError,)


def _compression(path: Path) -> str:
    return "Zstandard" if path.name.lower().endswith(".zst") else "gzip"


def _column(names: list[str], path: Path, text_field: str) -> str:
    """The column to read: ``text_field``, else ``messages`` (conversations)."""
    if text_field in names:
        return text_field
    if MESSAGES in names:
        return MESSAGES
    raise ValueError(f"data: {str(path)!r} has no column {text_field!r} (its columns: "
                     f"{', '.join(map(repr, names[:8]))})")


def _records_of_batches(batches, path: Path, text_field: str) -> Iterator[str | list]:
    row = 0
    for batch in batches:
        for text in batch.column(0).to_pylist():
            if text_field == MESSAGES:
                where = f"{str(path)!r} row {row}"
                row += 1
                if text is not None:
                    yield Conversation(check_messages(text, where), where)
                continue
            if not isinstance(text, str) and text is not None:
                raise ValueError(f"data: {str(path)!r} row {row}: {text_field!r} must be a string, got "
                                 f"{short_repr(text)}")
            row += 1
            if text:
                yield text


def _arrow_documents(path: Path, text_field: str) -> Iterator[str]:
    """An Arrow IPC file, as Hugging Face ``datasets`` writes them (``save_to_disk``: the stream
    format; the file format is read too), a record batch at a time."""
    try:
        import pyarrow as pa  # noqa: PLC0415 (optional: the data extra)
    except ImportError:
        raise ValueError(f"data: reading {str(path)!r} needs pyarrow: pip install 'bam-moe[data]' (or "
                         "pyarrow)") from None
    with pa.memory_map(str(path)) as source:
        try:
            reader = pa.ipc.open_stream(source)
        except (pa.ArrowInvalid, OSError):
            source.seek(0)
            try:
                reader = pa.ipc.open_file(source)
            except (pa.ArrowInvalid, OSError) as e:
                raise ValueError(f"data: {str(path)!r} is not an Arrow file ({str(e)[:200]})") from None
        names = reader.schema.names
        field = _column(names, path, text_field)
        column = names.index(field)
        if isinstance(reader, pa.ipc.RecordBatchFileReader):
            batches = (reader.get_batch(i).select([column]) for i in range(reader.num_record_batches))
        else:
            batches = (b.select([column]) for b in reader)
        try:
            yield from _records_of_batches(batches, path, field)
        except (pa.ArrowInvalid, OSError) as e:   # a file cut short: pyarrow says so as an OSError
            raise ValueError(f"data: {str(path)!r} is not a complete Arrow file ({str(e)[:200]})") from None


def _document(record, text_field: str, where: str) -> str | list:
    if not isinstance(record, dict):
        raise ValueError(f"data: {where} is not a JSON object, got {short_repr(record)}")
    if text_field not in record and MESSAGES in record:      # a conversation
        return Conversation(check_messages(record[MESSAGES], where), where)
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
    except (gzip.BadGzipFile, EOFError, *_zstd_errors()) as e:
        raise ValueError(f"data: {str(path)!r} is not a complete {_compression(path)} file ({e})") from None


def _json_documents(path: Path, text_field: str) -> Iterator[str]:
    try:
        with _open_text(path) as f:
            raw = f.read()
    except (gzip.BadGzipFile, EOFError, *_zstd_errors()) as e:
        raise ValueError(f"data: {str(path)!r} is not a complete {_compression(path)} file ({e})") from None
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
        import pyarrow.parquet as pq  # noqa: PLC0415 (optional: the data extra)
    except ImportError:
        raise ValueError(f"data: reading {str(path)!r} needs pyarrow: pip install 'bam-moe[data]' (or "
                         "pyarrow)") from None
    try:
        parquet = pq.ParquetFile(path)
    except Exception as e:   # pyarrow's ArrowInvalid and kin: the file is not Parquet, or cut short
        raise ValueError(f"data: {str(path)!r} is not a readable Parquet file ({str(e)[:200]})") from None
    field = _column(parquet.schema_arrow.names, path, text_field)
    yield from _records_of_batches(parquet.iter_batches(columns=[field]), path, field)
