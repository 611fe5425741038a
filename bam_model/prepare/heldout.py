"""Which documents are held out: by the hash of a key or of the text, and where to cut a lone
document (after a line break)."""
from __future__ import annotations

import hashlib

import numpy as np

HELDOUT_FRACTION = 0.1


def first_by_hash(keys: list[str], sizes: list[int], share: float) -> set[int]:
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


def held_by_hash(text: str, share: float) -> bool:
    """A record is held out when its text's SHA-256 lies in the first ``share`` of the hash range."""
    digest = hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest()
    return int.from_bytes(digest[:8], "big") < share * 2**64


def line_cut(tokens: np.ndarray, ends_line: np.ndarray, share: float) -> int:
    """Where to cut one document's ``tokens`` so that about ``share`` lies after the cut: just after
    a token that ends a line, when one lies within 1% of the document (at least 1,000 tokens) before
    that point, else at the point itself."""
    n = len(tokens)
    cut = min(max(1, int(n * (1 - share))), n - 1)
    lo = max(1, cut - max(1000, n // 100))
    window = np.asarray(tokens[lo:cut])
    hits = np.nonzero(ends_line[window])[0] if len(window) else []
    return lo + int(hits[-1]) + 1 if len(hits) else cut


def newline_tokens(tokenizer) -> np.ndarray:
    """[V] bool: which tokens end with a line break when decoded."""
    vocab = tokenizer.get_vocab_size()
    out = np.zeros(vocab, dtype=bool)
    for token, idx in tokenizer.get_vocab().items():
        if token.endswith(("\n", "\u010a", "<0x0A>")):   # plain, byte-level BPE (Ċ), SentencePiece bytes
            out[idx] = True
    return out
