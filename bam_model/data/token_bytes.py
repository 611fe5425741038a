"""How many bytes of text each token of a byte-level BPE stands for (bits per byte compare models
with different tokenizers)."""
from __future__ import annotations

import numpy as np


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte <-> printable character table, which byte-level BPE vocabularies are written in."""
    bs = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
          + list(range(ord("®"), ord("ÿ") + 1)))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def token_byte_lengths(tokenizer) -> np.ndarray:
    """[V] int64: how many UTF-8 bytes of text each token id stands for (0 for special tokens)."""
    char_to_byte = {c: b for b, c in _bytes_to_unicode().items()}
    lengths = np.zeros(tokenizer.get_vocab_size(), dtype=np.int64)
    specials = {t.content for t in tokenizer.get_added_tokens_decoder().values()}
    for token, idx in tokenizer.get_vocab().items():
        if token not in specials:
            if any(c not in char_to_byte for c in token):
                raise ValueError(f"tokenizer is not byte-level: token {token!r} has characters outside "
                                 "the byte alphabet")
            lengths[idx] = len(token)
    return lengths
