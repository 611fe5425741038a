"""A source's tokens and loss mask, of a split or of one part of its training documents (the
``task`` / ``mixup`` cut of weight-mixup training, ``split_train``)."""
from __future__ import annotations

import hashlib

import numpy as np

from ..prepare.heldout import first_by_hash, line_cut, newline_tokens
from ..tokenizer import load_tokenizer
from .sources import Source

# The two parts of a source's training documents that weight-mixup training takes its two kinds of
# step from (``split_train``): "task" (the weights) and "mixup" (the mixing coefficients).
TRAIN_PARTS = ("task", "mixup")


def _cut_at_line(text: str, share: float) -> int:
    """Where to cut ``text`` so that about ``share`` of it lies after the cut: at the start of a
    line when one starts within 1% of the text (at least 1,000 characters) before that point, else
    at the point itself, so that a text of few, long lines is not cut far from its share."""
    cut = int(len(text) * (1 - share))
    line_end = text.rfind("\n", max(0, cut - max(1000, len(text) // 100)), cut)
    return line_end + 1 if line_end > 0 else cut


def _doc_key(doc) -> str:
    if isinstance(doc, str):
        return doc
    return hashlib.sha256(np.ascontiguousarray(doc).tobytes()).hexdigest()


def split_train(documents: list, fraction: float, cut=None) -> tuple[list, list]:
    """(task, mixup): the training documents (texts, or token arrays) cut in two, about
    ``fraction`` of their size in "mixup". The cut depends only on the documents: they are ordered
    by the SHA-256 of their content and the first ones (at least one, never all; copies of a
    document together) go to "mixup" until they hold ``fraction``; a lone document is cut by
    ``cut(document, fraction)`` (for a text: at a line break near its last ``fraction``). Both
    parts keep the documents' own order. ``fraction`` 0 gives every document to "task"."""
    if not (isinstance(fraction, (int, float)) and not isinstance(fraction, bool) and 0 <= fraction < 1):
        raise ValueError(f"fraction must be a number in [0, 1), got {fraction!r}")
    if fraction == 0 or not len(documents):
        return list(documents), []
    if len(documents) == 1:
        at = (cut or _cut_at_line)(documents[0], fraction)
        return [documents[0][:at]], [documents[0][at:]]
    taken = first_by_hash([_doc_key(d) for d in documents], [len(d) for d in documents], fraction)
    return ([d for i, d in enumerate(documents) if i not in taken],
            [d for i, d in enumerate(documents) if i in taken])


_PARTS: dict[tuple, tuple[np.ndarray, np.ndarray | None]] = {}


def tokens(source: Source, split: str, tokenizer=None, part: tuple[str, float] | None = None) -> np.ndarray:
    """All documents of ``split`` as one token array (each document followed by EOS), mapped from
    the source's prepared data (``Source.prepared``): uint16 when the vocabulary allows, else
    uint32. ``part`` ("task" or "mixup", fraction) takes that part of the training documents only
    (``split_train``, by document; held in memory)."""
    return token_arrays(source, split, tokenizer, part)[0]


def loss_mask(source: Source, split: str, tokenizer=None, part: tuple[str, float] | None = None
              ) -> np.ndarray | None:
    """[tokens] uint8 beside ``tokens(...)``: 1 where a token is in the loss (a conversation's
    assistant turns, every token of other documents); None when every token is."""
    return token_arrays(source, split, tokenizer, part)[1]


def token_arrays(source: Source, split: str, tokenizer=None, part: tuple[str, float] | None = None
                 ) -> tuple[np.ndarray, np.ndarray | None]:
    """``(tokens(...), loss_mask(...))``, the source resolved once."""
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer()
    _check_part(part, split)
    data = source.prepared(tokenizer)
    if part is None:
        return data.tokens(split), data.mask(split)
    key = (str(data.path), data.digest, part)
    if key not in _PARTS:
        toks, ends = data.tokens("train"), data.doc_ends("train").astype(np.int64)
        mask = data.mask("train")
        starts = np.concatenate([[0], ends[:-1]])
        docs = [toks[a:b] for a, b in zip(starts, ends)]
        index = {id(d): (a, b) for d, a, b in zip(docs, starts, ends)}
        newline = newline_tokens(tokenizer)
        task, mixup = split_train(docs, part[1],
                                  cut=lambda d, share: line_cut(np.asarray(d), newline, share))
        chosen = task if part[0] == "task" else mixup
        arr = np.concatenate(chosen) if chosen else np.empty(0, dtype=toks.dtype)
        arr.flags.writeable = False
        part_mask = None
        if mask is not None:
            if len(docs) == 1:     # a lone document, cut in two
                cut = len(task[0])
                part_mask = np.array(mask[:cut] if part[0] == "task" else mask[cut:])
            else:
                part_mask = np.concatenate([mask[slice(*index[id(d)])] for d in chosen])
            part_mask.flags.writeable = False
        _PARTS[key] = arr, part_mask
    return _PARTS[key]


def source_digest(source: Source, tokenizer=None) -> str:
    """SHA-256 of a source's tokens, both splits (from the prepared data's index): changes when its
    documents or the tokenizer do (a resumed run checks that its data is the data it began with)."""
    return source.prepared(tokenizer if tokenizer is not None else load_tokenizer()).digest


def _check_part(part, split: str) -> None:
    if part is None:
        return
    if split != "train":
        raise ValueError(f"part applies to the train split, got split={split!r}")
    if not (isinstance(part, tuple) and len(part) == 2 and part[0] in TRAIN_PARTS):
        raise ValueError(f"part must be None or (one of {TRAIN_PARTS}, fraction), got {part!r}")
    if part[0] == "mixup" and part[1] == 0:
        raise ValueError("part ('mixup', 0) is empty: give a fraction above 0")
