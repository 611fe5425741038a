"""Prepared data: a corpus tokenized once into flat token files that training and evaluation map.

A prepared-data folder (``bam prepare SOURCE... --tokenizer MODEL --out DIR``) holds, per split
("train", "heldout"):

- ``{split}.tokens``: every document's token ids followed by the end-of-document token, one flat
  little-endian array (``uint16`` when the vocabulary has at most 65,536 tokens, else ``uint32``),
  as nanoGPT's ``train.bin`` and Megatron-LM's ``.bin`` keep them;
- ``{split}.docs``: ``uint64``, where each document ends in ``{split}.tokens`` (cumulative, the EOS
  included), as Megatron-LM's ``.idx`` keeps them;
- ``{split}.mask`` (only when the corpus holds conversations): ``uint8`` per token, 1 where it is in
  the loss (a conversation's assistant turns, and every token of other documents);

and ``bam-data.json``, the index: the tokenizer (its SHA-256, vocabulary size, end-of-document id),
the sources (each file's path, size and SHA-256), per split the token and document counts and each
file's size, SHA-256 and modification time. ``bam-manifest.json`` (kind "data") makes the folder
ours; the folder is written under the ownership rules of docs/reliability.md (staged inside the
target, ``bam-data.json`` moved in last, so a killed prepare leaves nothing that loads).

Reading (``PreparedData``) maps the files (``numpy.memmap``): start-up time and memory do not grow
with the corpus. Every open checks the files' sizes against the index (a truncated copy is refused
at once) and, for a file whose modification time differs from the one recorded, its SHA-256 (an
edit after preparing is refused; a copy that kept no times, ``cp`` without ``-p``, is hashed once
per process).

The held-out split is chosen by document, from the documents alone (the same corpus always splits
the same way): a text file is one document, and text files are held out whole, the first in the
order of the SHA-256 of their relative path until they hold ``heldout`` of the text files' bytes
(at least one, never all); a record (a JSON Lines, JSON or Parquet record) is held out when the
SHA-256 of its text falls in the first ``heldout`` of the hash range (copies of a document land
together). If one split is left empty, the last document of the other moves to it; a corpus of one
document is cut near ``1 - heldout`` of its tokens, after a line break.

Raw ``--data`` paths and the bundled corpus go through the same code into a cache folder
(``cache_root``), keyed by the files' paths, sizes and modification times and the tokenizer.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import itertools
import json
import os
import queue
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .chat import ChatTemplate, assistant_spans, token_mask
from .files.atomic import file_record, sha256, umask, write_json_atomic
from .files.checks import check_output
from .files.folders import write_folder
from .files.manifest import (
    STAGING_PREFIX,
    check_complete,
    clear_owned,
    is_leftover,
    plain_name,
    read_manifest,
)
from .files.reading import read_json
from .readers import file_format, read_documents, text_pieces
from .tokenizer import eos_token_id

INDEX = "bam-data.json"
DATA_FORMAT = "bam-data"
DATA_VERSION = 1
SPLITS = ("train", "heldout")
HELDOUT_FRACTION = 0.1
CACHE_ENV = "BAM_DATA_CACHE"
# Text given to one encode_batch call (documents are never split across calls; a long text file
# comes in pieces of TEXT_PIECE bytes, cut after a line break).
BATCH_BYTES = 8 << 20
BATCH_DOCS = 8192
INDEX_MAX_BYTES = 1 << 30   # about 200 bytes a source file: millions of files


_DIGESTS: dict[int, tuple] = {}


def tokenizer_digest(tokenizer) -> str:
    """SHA-256 of what a tokenizer does (its tokenizer.json without the padding and truncation
    settings, keys sorted): two tokenizers with equal digests give the same ids for every text.
    Remembered per tokenizer object while its content stays the same."""
    text = tokenizer.to_str()
    seen = _DIGESTS.get(id(tokenizer))
    if seen is not None and seen[0] is tokenizer and seen[1] == len(text) and seen[2] == hash(text):
        return seen[3]
    digest = _digest_of(text)
    _DIGESTS[id(tokenizer)] = (tokenizer, len(text), hash(text), digest)
    return digest


def _digest_of(text: str) -> str:
    spec = json.loads(text)
    for key in ("padding", "truncation"):
        spec.pop(key, None)
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def cache_root() -> Path:
    """Where raw ``--data`` paths and the bundled corpus are prepared: ``$BAM_DATA_CACHE``, else
    ``$XDG_CACHE_HOME/bam/data``, else ``~/.cache/bam/data``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "bam" / "data"


# --- inputs ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Input:
    """One file to read: ``key`` names it in the corpus (its path relative to the source given, for
    the held-out choice of text files); ``split`` is given for files that are already split (the
    bundled corpus), else None (chosen by document)."""
    path: Path
    key: str
    split: str | None = None


# A Hugging Face ``datasets`` folder (``Dataset.save_to_disk``) holds these beside its Arrow files;
# one of a ``DatasetDict`` holds DATASET_DICT and a folder per split.
DATASET_FILES = ("state.json", "dataset_info.json")
DATASET_DICT = "dataset_dict.json"
# A DatasetDict's splits, by the start of their names: those that train and those held out as they
# are ("train_sft", "test_sft", "validation", ...).
TRAIN_SPLITS = ("train",)
HELDOUT_SPLITS = ("valid", "test", "eval", "dev", "heldout")


def _split_kind(name: str) -> str | None:
    low = name.lower()
    return "train" if low.startswith(TRAIN_SPLITS) else "heldout" if low.startswith(HELDOUT_SPLITS) else None


def _dataset_arrow_files(folder: Path) -> list[Path]:
    """The Arrow files of a ``datasets`` folder, in its own order (``state.json``'s data files)."""
    state = read_json(str(folder / "state.json"))
    listed = state.get("_data_files")
    names = [d.get("filename") for d in listed if isinstance(d, dict)] if isinstance(listed, list) else []
    if not names or not all(isinstance(n, str) and plain_name(n) for n in names):
        raise ValueError(f"data: {str(folder)!r} looks like a datasets folder, but its state.json lists no "
                         "data files")
    for n in names:
        if not (folder / n).is_file():
            raise ValueError(f"data: {str(folder / n)!r}, listed in {str(folder / 'state.json')!r}, is "
                             "missing")
    return [folder / n for n in names]


def _folder_files(path: Path) -> list[tuple[Path, str | None]]:
    """(file, split or None) of a folder, recursively, hidden entries left out; a ``datasets``
    folder gives its Arrow files. A DatasetDict with training splits ("train...") and held-out ones
    ("valid...", "test...", "eval...", "dev...") keeps them; one of training splits only is split by
    document; a split of another name is refused (give the split folders to read instead)."""
    if (path / DATASET_DICT).is_file():
        splits = read_json(str(path / DATASET_DICT)).get("splits")
        if not (isinstance(splits, list) and splits and all(isinstance(s, str) and plain_name(s)
                                                            for s in splits)):
            raise ValueError(f"data: {str(path / DATASET_DICT)!r} lists no splits")
        kinds = {s: _split_kind(s) for s in splits}
        unknown = [s for s, k in kinds.items() if k is None]
        if unknown:
            raise ValueError(f"data: the DatasetDict {str(path)!r} has the split(s) "
                             f"{', '.join(map(repr, unknown))}, neither training (train...) nor held out "
                             "(valid..., test..., eval..., dev...): give the split folders to read instead, "
                             f"e.g. {str(path / splits[0])!r}")
        given = set(kinds.values()) == {"train", "heldout"}
        return [(f, kinds[s] if given else None) for s in splits for f in _dataset_arrow_files(path / s)]
    if all((path / n).is_file() for n in DATASET_FILES):
        return [(f, None) for f in _dataset_arrow_files(path)]
    if is_prepared(path):
        raise ValueError(f"data: {str(path)!r} is prepared data (bam prepare wrote it), not a source to "
                         "read: give it to --data as it is, or prepare the files it was prepared from")
    out = []
    for entry in sorted(path.iterdir()):
        if entry.name.startswith("."):
            continue
        if entry.is_dir() and not entry.is_symlink():     # as rglob: links to folders are not followed
            out += _folder_files(entry)
        elif entry.is_file():
            out.append((entry, None))
    return out


def list_inputs(sources: Iterable[str | os.PathLike]) -> list[Input]:
    """The files of ``sources`` (files, or folders read recursively without hidden entries), in
    order; a ValueError for a path that does not exist, an empty folder, a name that is not UTF-8."""
    inputs: list[Input] = []
    for source in sources:
        path = Path(os.path.abspath(source))
        if path.is_file():
            inputs.append(Input(path, path.name))
            continue
        if not path.is_dir():
            problem = "does not exist" if not os.path.lexists(path) else "is neither a file nor a folder"
            raise ValueError(f"data: {str(source)!r} {problem}")
        found = _folder_files(path)
        if not found:
            raise ValueError(f"data: folder {str(source)!r} holds no files")
        for p, split in found:
            try:
                str(p).encode("utf-8")
            except UnicodeEncodeError:   # a name of bytes that are not UTF-8 (read as lone surrogates)
                raise ValueError(f"data: {ascii(str(p))} has a file name that is not UTF-8; rename it or "
                                 "move it out of the folder") from None
            inputs.append(Input(p, f"{path.name}/{p.relative_to(path).as_posix()}", split))
    if not inputs:
        raise ValueError("data: no source given")
    return inputs


def _first_by_hash(keys: list[str], sizes: list[int], share: float) -> set[int]:
    """Indices of the items taken first in the order of the SHA-256 of their keys, until they hold
    ``share`` of the total size: at least one, never all (equal keys are taken together)."""
    groups: dict[str, list[int]] = {}
    for i, key in enumerate(keys):
        groups.setdefault(hashlib.sha256(key.encode()).hexdigest(), []).append(i)
    total = sum(sizes)
    taken, held = set(), 0
    for digest in sorted(groups)[:-1]:
        taken.update(groups[digest])
        held += sum(sizes[i] for i in groups[digest])
        if held >= share * total:
            break
    return taken


def _held_by_hash(text: str, share: float) -> bool:
    """A record is held out when its text's SHA-256 lies in the first ``share`` of the hash range."""
    digest = hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest()
    return int.from_bytes(digest[:8], "big") < share * 2**64


def _pieces(inputs: list[Input], text_field: str, share: float, chat: ChatTemplate | None
            ) -> Iterator[tuple[str, str, bool, int, list | None]]:
    """(text, split, ends a document, bytes of input consumed, assistant spans of a conversation or
    None) for every piece of every document."""
    texts = [i for i, inp in enumerate(inputs) if inp.split is None and file_format(inp.path) == "text"]
    sizes = [inputs[i].path.stat().st_size for i in texts]
    # A text file larger than twice the held-out share of them all is never held out whole (it would
    # leave little to train on); if no file is held out, ``_balance`` cuts the last one.
    small = [j for j, size in enumerate(sizes) if size <= 2 * share * sum(sizes)]
    held_texts = {texts[small[j]] for j in _first_by_hash([inputs[texts[j]].key for j in small],
                                                            [sizes[j] for j in small], share)}
    for i, inp in enumerate(inputs):
        if file_format(inp.path) == "text":
            split = inp.split or ("heldout" if i in held_texts else "train")
            for text, last, used in text_pieces(inp.path):
                yield text, split, last, used, None
            continue
        size = inp.path.stat().st_size
        seen = 0
        for doc in read_documents(inp.path, text_field):
            spans = None
            if isinstance(doc, list):           # a conversation (readers.Conversation)
                where = doc.where
                if chat is None:
                    raise ValueError(f"data: {where} is a conversation ('messages'), which is rendered with "
                                     "the model's chat template: prepare the data with bam prepare "
                                     "--tokenizer MODEL, MODEL having a chat template")
                doc, spans = assistant_spans(chat, doc, where)
            split = inp.split or ("heldout" if _held_by_hash(doc, share) else "train")
            used = min(len(doc.encode("utf-8", "surrogatepass")), size - seen)
            seen += used
            yield doc, split, True, used, spans
        if size > seen:   # the rest of the file's bytes, for the progress bar
            yield "", "train", False, size - seen, None


def _batches(pieces: Iterator) -> Iterator[list]:
    batch, size = [], 0
    for piece in pieces:
        batch.append(piece)
        size += len(piece[0])
        if size >= BATCH_BYTES or len(batch) >= BATCH_DOCS:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


@contextlib.contextmanager
def _read_ahead(batches: Iterator[list], depth: int = 2):
    """``batches``, read in a thread of its own (JSON and Parquet decoding overlap the tokenizer,
    which releases the GIL); its exceptions are raised in the consumer. Leaving the block stops the
    thread."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    done, stop = object(), threading.Event()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def work():
        try:
            for b in batches:
                if not put(b):
                    return
            put(done)
        except BaseException as e:  # handed to the consumer
            put(e)

    def consume():
        while True:
            item = q.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    t = threading.Thread(target=work, name="bam-prepare-read", daemon=True)
    t.start()
    try:
        yield consume()
    finally:
        stop.set()
        t.join()


# --- writing ---------------------------------------------------------------------------------------

class _SplitWriter:
    """The token, document and (once a conversation came) loss-mask files of one split."""

    def __init__(self, folder: Path, split: str, dtype: np.dtype):
        self.split, self.dtype = split, dtype
        self.tokens_path, self.docs_path = folder / f"{split}.tokens", folder / f"{split}.docs"
        self.mask_path = folder / f"{split}.mask"
        self.tokens_file = open(self.tokens_path, "wb")
        self.docs_file = open(self.docs_path, "wb")
        self.mask_file = None
        self.n_tokens = 0
        self.n_docs = 0
        self.open_doc = 0          # tokens of the document being written (not ended yet)

    def start_mask(self) -> None:
        """Begin the loss mask: every token so far is in the loss."""
        if self.mask_file is None:
            self.mask_file = open(self.mask_path, "wb")
            for start in range(0, self.n_tokens, 1 << 24):
                self.mask_file.write(b"\x01" * min(1 << 24, self.n_tokens - start))

    def write(self, ids: np.ndarray, ends: np.ndarray, mask: np.ndarray | None = None) -> None:
        """``ids``: tokens (EOS included where a document ends); ``ends``: offsets into ``ids``
        where documents end; ``mask``: uint8, 1 where the token is in the loss (None: all are)."""
        self.tokens_file.write(ids.tobytes())
        if mask is not None:
            self.start_mask()
        if self.mask_file is not None:
            self.mask_file.write(mask.tobytes() if mask is not None else b"\x01" * len(ids))
        if len(ends):
            self.docs_file.write((self.n_tokens + ends).astype("<u8").tobytes())
            self.n_docs += len(ends)
            self.open_doc = len(ids) - int(ends[-1])
        else:
            self.open_doc += len(ids)
        self.n_tokens += len(ids)

    def close(self) -> None:
        for f in (self.tokens_file, self.docs_file, self.mask_file):
            if f is not None:
                f.close()

    def doc_ends(self) -> np.ndarray:
        return np.fromfile(self.docs_path, dtype="<u8")

    def paths(self) -> list[Path]:
        return [self.tokens_path, self.docs_path] + ([self.mask_path] if self.mask_file is not None else [])


def _append(src: Path, dst: Path, offset: int) -> None:
    with open(src, "rb") as f, open(dst, "ab") as out:
        f.seek(offset)
        for chunk in iter(lambda: f.read(1 << 24), b""):
            out.write(chunk)


def _move_tail(src: _SplitWriter, dst: _SplitWriter, start: int) -> None:
    """Move ``src``'s tokens from ``start`` to its end (whole documents' worth, or the tail of its
    last) to the end of ``dst``, as one document. Both are closed, with masks or both without."""
    itemsize = src.dtype.itemsize
    _append(src.tokens_path, dst.tokens_path, start * itemsize)
    os.truncate(src.tokens_path, start * itemsize)
    if src.mask_file is not None:
        _append(src.mask_path, dst.mask_path, start)
        os.truncate(src.mask_path, start)
    moved = src.n_tokens - start
    ends = src.doc_ends()
    kept = ends[ends <= start]
    if not len(kept) or kept[-1] != start:        # a document cut in two: its head ends at the cut
        kept = np.append(kept, np.uint64(start))
    kept.astype("<u8").tofile(src.docs_path)
    with open(dst.docs_path, "ab") as f:
        f.write(np.asarray([dst.n_tokens + moved], dtype="<u8").tobytes())
    src.n_tokens, src.n_docs = start, len(kept)
    dst.n_tokens, dst.n_docs = dst.n_tokens + moved, dst.n_docs + 1


def _line_cut(tokens: np.ndarray, ends_line: np.ndarray, share: float) -> int:
    """Where to cut one document's ``tokens`` so that about ``share`` lies after the cut: just after
    a token that ends a line, when one lies within 1% of the document (at least 1,000 tokens) before
    that point, else at the point itself."""
    n = len(tokens)
    cut = min(max(1, int(n * (1 - share))), n - 1)
    lo = max(1, cut - max(1000, n // 100))
    window = np.asarray(tokens[lo:cut])
    hits = np.nonzero(ends_line[window])[0] if len(window) else []
    return lo + int(hits[-1]) + 1 if len(hits) else cut


def _newline_tokens(tokenizer) -> np.ndarray:
    """[V] bool: which tokens end with a line break when decoded."""
    vocab = tokenizer.get_vocab_size()
    out = np.zeros(vocab, dtype=bool)
    for token, idx in tokenizer.get_vocab().items():
        if token.endswith(("\n", "\u010a", "<0x0A>")):   # plain, byte-level BPE (Ċ), SentencePiece bytes
            out[idx] = True
    return out


def _balance(writers: dict[str, _SplitWriter], tokenizer, share: float) -> None:
    """Leave neither split empty (see the module doc)."""
    train, held = writers["train"], writers["heldout"]
    if train.n_docs and held.n_docs:
        return
    full, empty = (train, held) if train.n_docs else (held, train)
    want = share if full is train else 1 - share        # the share of the tokens the empty split takes
    ends = full.doc_ends()
    last = int(ends[-2]) if len(ends) > 1 else 0        # where the last document starts
    if len(ends) > 1 and full.n_tokens - last <= 2 * want * full.n_tokens:
        _move_tail(full, empty, last)                   # the last document, whole
        return
    # One document, or a last one too large to move whole: cut it after a line break so that about
    # ``want`` of all the tokens move; the EOS stays at the end of the tail.
    if full.n_tokens - last < 3:
        raise ValueError(f"data: the corpus holds {full.n_tokens - 1} token(s), too few to split into "
                         "training and held-out text")
    tokens = np.memmap(full.tokens_path, dtype=full.dtype, mode="r")
    doc = tokens[last:-1]
    moved = min(want * full.n_tokens / len(doc), 0.99)
    cut = last + _line_cut(doc, _newline_tokens(tokenizer), moved)
    del tokens, doc
    _move_tail(full, empty, cut)


def _progress(total: int | None, enabled):
    from tqdm.auto import tqdm  # noqa: PLC0415 (the model extra: bam_model imports without it)

    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1000, desc="prepare",
                disable=(None if enabled is None else not enabled), dynamic_ncols=True, smoothing=0.1)


def _encode(tokenizer, texts: list[str]):
    fast = getattr(tokenizer, "encode_batch_fast", None)   # no character offsets: what we keep is the ids
    return (fast or tokenizer.encode_batch)(texts, add_special_tokens=False)


def _encode_pieces(tokenizer, pieces: list) -> list:
    """The encodings of ``pieces``' texts; a conversation's with character offsets (its mask needs
    them), the rest without."""
    chats = [i for i, p in enumerate(pieces) if p[4] is not None]
    if not chats:
        return _encode(tokenizer, [p[0] for p in pieces])
    out = [None] * len(pieces)
    plain = [i for i, p in enumerate(pieces) if p[4] is None]
    for i, enc in zip(plain, _encode(tokenizer, [pieces[i][0] for i in plain]) if plain else []):
        out[i] = enc
    for i, enc in zip(chats, tokenizer.encode_batch([pieces[i][0] for i in chats], add_special_tokens=False)):
        out[i] = enc
    return out


def write_prepared(folder: Path, inputs: list[Input], tokenizer, *, text_field: str = "text",
                   heldout: float = HELDOUT_FRACTION, progress=None, tokenizer_from: str | None = None,
                   chat: ChatTemplate | None = None) -> dict:
    """Tokenize ``inputs`` into the (staging) folder ``folder``; returns the index (also written
    there as ``bam-data.json``)."""

    eos = eos_token_id(tokenizer)
    vocab = tokenizer.get_vocab_size()
    dtype = token_dtype(vocab)
    plain = all(file_format(i.path) in ("text", "jsonl", "json") and not i.path.name.lower().endswith(".gz")
                for i in inputs)
    total_bytes = sum(i.path.stat().st_size for i in inputs)
    writers = {s: _SplitWriter(folder, s, dtype) for s in SPLITS}
    n_text = 0
    started = time.perf_counter()
    bar = _progress(total_bytes if plain else None, progress)
    tokens_done = 0
    try:
        with _read_ahead(_batches(_pieces(inputs, text_field, heldout, chat))) as batches:
            for batch in batches:
                keep = [p for p in batch if p[0] or p[2]]
                encodings = _encode_pieces(tokenizer, keep)
                for split in SPLITS:
                    mine = [(enc, p) for enc, p in zip(encodings, keep) if p[1] == split]
                    if not mine:
                        continue
                    lists = [enc.ids + [eos] if p[2] else enc.ids for enc, p in mine]
                    lengths = np.fromiter(map(len, lists), dtype=np.int64, count=len(lists))
                    ids = np.fromiter(itertools.chain.from_iterable(lists), dtype=dtype,
                                      count=int(lengths.sum()))
                    ends = np.cumsum(lengths)[[p[2] for _, p in mine]]
                    mask = None
                    if any(p[4] is not None for _, p in mine):   # conversations: the assistant's tokens
                        mask = np.concatenate([
                            np.append(token_mask(enc.offsets, p[4]), np.uint8(0))[:n] if p[4] is not None
                            else np.ones(n, dtype=np.uint8) for (enc, p), n in zip(mine, lengths)])
                    writers[split].write(ids, ends, mask)
                    tokens_done += len(ids)
                used = sum(p[3] for p in batch)
                n_text += sum(len(p[0].encode("utf-8", "surrogatepass")) for p in batch)
                bar.update(used)
                rate = tokens_done / max(time.perf_counter() - started, 1e-9)
                bar.set_postfix_str(f"{rate:,.0f} tokens/s", refresh=False)
    finally:
        bar.close()
        for w in writers.values():
            w.close()
    for w in writers.values():
        if w.open_doc:     # a text file's last piece always ends its document: never left open
            raise AssertionError(f"{w.split}: a document was left open")
    if any(w.mask_file is not None for w in writers.values()):
        for w in writers.values():       # both splits have a mask, or neither
            if w.mask_file is None:
                w.start_mask()
                w.mask_file.close()
    if writers["train"].n_docs + writers["heldout"].n_docs == 0:
        raise ValueError("data: the corpus holds no document (every file and record is empty)")
    _balance(writers, tokenizer, heldout)
    seconds = time.perf_counter() - started
    index = {
        "format": DATA_FORMAT, "version": DATA_VERSION,
        "tokenizer": {"sha256": tokenizer_digest(tokenizer), "vocab_size": vocab, "eos_id": eos,
                      "from": tokenizer_from},
        "dtype": dtype.name, "text_field": text_field, "heldout": heldout,
        "chat": None if chat is None else {
            "template_sha256": hashlib.sha256(chat.template.encode()).hexdigest(),
            "masked": writers["train"].mask_file is not None},
        "sources": [{"path": str(i.path), "key": i.key, "bytes": i.path.stat().st_size,
                     "sha256": sha256(i.path), **({"split": i.split} if i.split else {})}
                    for i in inputs],
        "text_bytes": n_text, "seconds": round(seconds, 3),
        "splits": {},
    }
    for split, w in writers.items():
        records = {p.name: {**file_record(p), "mtime_ns": p.stat().st_mtime_ns} for p in w.paths()}
        index["splits"][split] = {"tokens": w.n_tokens, "documents": w.n_docs, "files": records}
    write_json_atomic(folder / INDEX, index)
    return index


def prepare(sources, tokenizer, out, *, text_field: str = "text", heldout: float = HELDOUT_FRACTION,
            progress=None, tokenizer_from: str | None = None, inputs: list[Input] | None = None,
            flag: str = "--out", chat: ChatTemplate | None = None) -> PreparedData:
    """Prepare the files of ``sources`` (paths) with ``tokenizer`` into the folder ``out`` (new, or
    prepared data of ours, which is replaced); returns it opened. ``heldout``: the share held out,
    in (0, 1). ``progress``: True, False or None (a bar when stderr is a terminal). ``chat``: the
    model's chat template, which renders conversation records (``messages``); their tokens are in
    the loss only where the assistant speaks (``{split}.mask``)."""
    if not isinstance(text_field, str) or not text_field:
        raise ValueError(f"text_field must be a non-empty string, got {text_field!r}")
    if isinstance(heldout, bool) or not isinstance(heldout, (int, float)) or not 0 < heldout < 1:
        raise ValueError(f"heldout must be a number in (0, 1), got {heldout!r}")
    inputs = inputs if inputs is not None else list_inputs(sources)
    out = Path(os.path.abspath(out))
    check_output(out, "data", flag=flag, inputs=[("SOURCE", i.path) for i in inputs])

    records = {}

    def write(stage: Path) -> None:
        index = write_prepared(stage, inputs, tokenizer, text_field=text_field, heldout=heldout,
                               progress=progress, tokenizer_from=tokenizer_from, chat=chat)
        for split in SPLITS:      # hashed once: the manifest takes the index's records
            for name, r in index["splits"][split]["files"].items():
                records[name] = {"bytes": r["bytes"], "sha256": r["sha256"]}

    write_folder(out, write, "data", flag=flag, records=records)
    # The files were moved, not rewritten: their records (sizes, hashes, times) still hold.
    return PreparedData(out, verify=False)


# --- reading ---------------------------------------------------------------------------------------

def is_prepared(path) -> bool:
    """Whether ``path`` is a folder of prepared data: it holds ``bam-data.json``, or it is ours as
    one (our manifest of kind "data", or a staging folder a killed ``bam prepare`` left), in which
    case opening it says what it lacks."""
    path = Path(path)
    if not path.is_dir():
        return False
    if (path / INDEX).is_file():
        return True
    manifest = read_manifest(path)
    if manifest is not None:
        return manifest["kind"] == "data"
    return any(e.name.startswith(STAGING_PREFIX) and is_leftover(e) for e in path.iterdir())


_VERIFIED: set[tuple] = set()


class PreparedData:
    """An opened prepared-data folder: ``tokens(split)`` and ``doc_ends(split)`` map its files."""

    def __init__(self, path, verify: bool = True):
        self.path = Path(os.path.abspath(path))
        where = str(self.path)
        check_complete(self.path)
        index_path = self.path / INDEX
        if not index_path.is_file():
            raise ValueError(f"data: {where!r} holds no prepared data (no {INDEX}: a bam prepare into it did "
                             "not finish?); prepare it again with bam prepare")
        if index_path.stat().st_size > INDEX_MAX_BYTES:
            raise ValueError(f"data: {str(index_path)!r} is larger than an index of bam's")
        index = read_json(str(index_path))
        self.index = index = _check_index(index, str(index_path))
        self.dtype = np.dtype(index["dtype"])
        # Every file is checked and mapped now: a folder prepared again while this process runs (the
        # files renamed over) does not change what it reads.
        self._maps: dict[tuple[str, str], np.ndarray] = {}
        kinds = {"tokens": self.dtype.newbyteorder("<"), "docs": np.dtype("<u8"), "mask": np.dtype(np.uint8)}
        for split in SPLITS:
            for name, record in index["splits"][split]["files"].items():
                self._check_file(self.path / name, record, verify)
                kind = name.split(".", 1)[1]
                self._maps[(split, kind)] = (np.memmap(self.path / name, dtype=kinds[kind], mode="r")
                                             if record["bytes"] else np.empty(0, dtype=kinds[kind]))

    def _check_file(self, path: Path, record: dict, verify: bool) -> None:
        try:
            st = path.stat()
        except FileNotFoundError:
            raise ValueError(f"data: {str(path)!r} is missing; prepare the data again") from None
        if st.st_size != record["bytes"]:
            raise ValueError(f"data: {str(path)!r} has {st.st_size:,} bytes, but {INDEX} says "
                             f"{record['bytes']:,} (cut short or changed after preparing); prepare the data "
                             "again")
        key = (str(path), st.st_size, st.st_mtime_ns, st.st_ino)
        if verify and st.st_mtime_ns != record.get("mtime_ns") and key not in _VERIFIED:
            if sha256(path) != record["sha256"]:
                raise ValueError(f"data: {str(path)!r} was changed after preparing (its SHA-256 is not the "
                                 f"one {INDEX} records); prepare the data again")
            _VERIFIED.add(key)

    @property
    def digest(self) -> str:
        """SHA-256 over the token and document files of both splits (what a run records it started from)."""
        h = hashlib.sha256(f"{self.dtype.name}|".encode())
        for split in SPLITS:
            for name, record in sorted(self.index["splits"][split]["files"].items()):
                h.update(f"{name}:{record['bytes']}:{record['sha256']}|".encode())
        return h.hexdigest()

    def _map(self, split: str, kind: str) -> np.ndarray:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        return self._maps[(split, kind)]

    def tokens(self, split: str) -> np.ndarray:
        """The split's tokens, mapped read-only (each document followed by the end-of-document id)."""
        return self._map(split, "tokens")

    def mask(self, split: str) -> np.ndarray | None:
        """[tokens] uint8: 1 where the token is in the loss (conversations: the assistant's turns), or
        None when every token is."""
        if f"{split}.mask" not in self.index["splits"][split]["files"]:
            return None
        return self._map(split, "mask")

    def doc_ends(self, split: str) -> np.ndarray:
        """[documents] uint64: where each document of the split ends in ``tokens(split)``."""
        return self._map(split, "docs")

    def check_tokenizer(self, tokenizer) -> None:
        """Refuse a tokenizer other than the one the data was prepared with, naming both."""
        want = self.index["tokenizer"]
        if tokenizer_digest(tokenizer) != want["sha256"]:
            origin = f" of {want['from']}" if want.get("from") else ""
            have = f"{tokenizer.get_vocab_size():,} tokens, SHA-256 {tokenizer_digest(tokenizer)[:12]}"
            raise ValueError(f"data: {str(self.path)!r} was prepared with the tokenizer{origin} "
                             f"({want['vocab_size']:,} tokens, SHA-256 {want['sha256'][:12]}), not this "
                             f"model's ({have}); prepare it again with bam prepare --tokenizer MODEL")


def _check_index(index: dict, where: str) -> dict:
    def bad(what: str):
        raise ValueError(f"data: {where} is not an index of bam's prepared data ({what}); prepare the data "
                         "again")

    if index.get("format") != DATA_FORMAT:
        bad(f"its format is {index.get('format')!r}, not {DATA_FORMAT!r}")
    if index.get("version") != DATA_VERSION:
        bad(f"version {index.get('version')!r}; this bam reads version {DATA_VERSION}")
    def count(value) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and value >= 0

    tok = index.get("tokenizer")
    if not (isinstance(tok, dict) and isinstance(tok.get("sha256"), str) and count(tok.get("vocab_size"))
            and count(tok.get("eos_id")) and tok["eos_id"] < tok["vocab_size"]):
        bad("no tokenizer record")
    if index.get("dtype") != token_dtype(tok["vocab_size"]).name:
        bad(f"dtype {index.get('dtype')!r} for a vocabulary of {tok['vocab_size']} tokens")
    splits = index.get("splits")
    if not isinstance(splits, dict):
        bad("no splits")
    for split in SPLITS:
        s = splits.get(split)
        if not (isinstance(s, dict) and count(s.get("tokens")) and count(s.get("documents"))
                and isinstance(s.get("files"), dict)
                and set(s["files"]) - {f"{split}.mask"} == {f"{split}.tokens", f"{split}.docs"}
                and all(isinstance(r, dict) and count(r.get("bytes"))
                        and isinstance(r.get("sha256"), str) for r in s["files"].values())):
            bad(f"split {split!r} is not described")
        itemsize = np.dtype(index["dtype"]).itemsize
        if (s["files"][f"{split}.tokens"]["bytes"] != s["tokens"] * itemsize
                or s["files"][f"{split}.docs"]["bytes"] != s["documents"] * 8
                or s["files"].get(f"{split}.mask", {"bytes": s["tokens"]})["bytes"] != s["tokens"]):
            bad(f"split {split!r}: its counts and file sizes disagree")
    return index


# --- the cache -------------------------------------------------------------------------------------

_OPEN: dict[tuple, PreparedData] = {}


def cached(inputs: list[Input], tokenizer, *, text_field: str = "text", what: str = "data",
           progress=None) -> PreparedData:
    """``inputs`` prepared with ``tokenizer`` in the cache (``cache_root``): prepared once, then
    opened. The key: each file's path, size and modification time, the tokenizer and the options.
    Processes preparing one key wait for each other (the first prepares, the rest open it)."""
    stats = []
    for i in inputs:
        st = i.path.stat()
        stats.append((str(i.path), i.key, i.split, st.st_size, st.st_mtime_ns))
    key_text = json.dumps({"version": DATA_VERSION, "tokenizer": tokenizer_digest(tokenizer),
                           "text_field": text_field, "heldout": HELDOUT_FRACTION, "inputs": stats},
                          sort_keys=True)
    key = hashlib.sha256(key_text.encode()).hexdigest()[:32]
    if (key,) in _OPEN:
        return _OPEN[(key,)]
    root = cache_root()
    folder = root / key
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"data: cannot make the data cache {str(root)!r} ({e.strerror}); set {CACHE_ENV} "
                         "to a writable folder") from None
    with _wait_lock(root / f"{key}.lock"):
        opened = None
        if is_prepared(folder):
            with contextlib.suppress(ValueError):
                opened = PreparedData(folder)
        if opened is None:
            print(f"data: preparing {what} once, into the cache {str(folder)!r}", file=sys.stderr)
            opened = prepare(None, tokenizer, folder, text_field=text_field, progress=progress, inputs=inputs,
                             flag="data cache")
            _remove_stale(root, key, opened.index)
    _OPEN[(key,)] = opened
    return opened


def _remove_stale(root: Path, key: str, index: dict) -> None:
    """Remove the cache entries that ``index``'s entry replaces: of the same files (by path), the
    same tokenizer and options, prepared before those files changed. An entry another process
    holds (its lock taken) is left for later."""
    def same(other: dict) -> bool:
        try:
            return (other.get("format") == DATA_FORMAT
                    and [s["path"] for s in other["sources"]] == [s["path"] for s in index["sources"]]
                    and other["tokenizer"]["sha256"] == index["tokenizer"]["sha256"]
                    and other.get("text_field") == index["text_field"])
        except (KeyError, TypeError, AttributeError):    # an index of another layout: not ours to judge
            return False

    for entry in root.iterdir():
        if entry.name == key or not entry.is_dir() or entry.is_symlink() or not (entry / INDEX).is_file():
            continue
        manifest = read_manifest(entry)
        try:
            stale = (manifest is not None and manifest["kind"] == "data"
                     and same(read_json(str(entry / INDEX))))
        except ValueError:
            continue
        if not stale:
            continue
        lock = root / f"{entry.name}.lock"
        fd = _open_lock(lock)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            continue
        try:
            clear_owned(entry)
            with contextlib.suppress(OSError):
                entry.rmdir()
            with contextlib.suppress(OSError):
                lock.unlink()
        finally:
            os.close(fd)


def _open_lock(path: Path) -> int:
    """The lock file beside a cache entry (created; never opened through a link)."""
    return os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666 & ~umask())


@contextlib.contextmanager
def _wait_lock(path: Path):
    """An exclusive ``flock`` on ``path`` (created), waited for: processes preparing one cache entry
    take turns."""
    fd = _open_lock(path)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def open_prepared(path) -> PreparedData:
    """A prepared-data folder, opened once per process."""
    path = os.path.abspath(path)
    try:
        st = os.stat(os.path.join(path, INDEX))
    except FileNotFoundError:
        return PreparedData(path)       # says what the folder lacks
    key = (path, st.st_mtime_ns, st.st_size)
    if key not in _OPEN:
        _OPEN[key] = PreparedData(path)
    return _OPEN[key]


def describe(index: dict) -> str:
    t, h = index["splits"]["train"], index["splits"]["heldout"]
    return (f"{t['documents'] + h['documents']:,} documents, {t['tokens'] + h['tokens']:,} tokens "
            f"({t['tokens']:,} train, {h['tokens']:,} held out, {index['dtype']})")


__all__ = ["INDEX", "PreparedData", "cache_root", "cached", "describe", "is_prepared", "list_inputs",
           "open_prepared", "prepare", "tokenizer_digest"]
