"""The index of a prepared-data folder (``bam-data.json``): its format, the token dtype, the
digest of a tokenizer, and the check of an index read back."""
from __future__ import annotations

import hashlib
import json

import numpy as np

INDEX = "bam-data.json"
DATA_FORMAT = "bam-data"
DATA_VERSION = 1
SPLITS = ("train", "heldout")
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


def check_index(index: dict, where: str) -> dict:
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


def describe(index: dict) -> str:
    t, h = index["splits"]["train"], index["splits"]["heldout"]
    return (f"{t['documents'] + h['documents']:,} documents, {t['tokens'] + h['tokens']:,} tokens "
            f"({t['tokens']:,} train, {h['tokens']:,} held out, {index['dtype']})")
