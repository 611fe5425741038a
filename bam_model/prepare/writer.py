"""The files of one split as they are written (``SplitWriter``), and leaving neither split empty
(``balance``: the last document, or the tail of a lone one, moved to the empty split)."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .heldout import line_cut, newline_tokens


class SplitWriter:
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


def _move_tail(src: SplitWriter, dst: SplitWriter, start: int) -> None:
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


def balance(writers: dict[str, SplitWriter], tokenizer, share: float) -> None:
    """Leave neither split empty (see the package doc, ``bam_model.prepare``)."""
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
    cut = last + line_cut(doc, newline_tokens(tokenizer), moved)
    del tokens, doc
    _move_tail(full, empty, cut)
