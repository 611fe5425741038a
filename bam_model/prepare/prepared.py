"""Opening a prepared-data folder: ``PreparedData`` maps its files, checked against the index first."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np

from ..files.atomic import sha256
from ..files.manifest import STAGING_PREFIX, check_complete, is_leftover, read_manifest
from ..files.reading import read_json
from .index import INDEX, INDEX_MAX_BYTES, SPLITS, check_index, tokenizer_digest


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
        self.index = index = check_index(index, str(index_path))
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
