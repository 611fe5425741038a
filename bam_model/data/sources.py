"""Sources: the bundled domains and ``--data`` specs (a domain, a mixture, a path), each resolved
once per run to its prepared data."""
from __future__ import annotations

import gzip
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..prepare.cache import cached, open_prepared
from ..prepare.index import tokenizer_digest
from ..prepare.inputs import Input, list_inputs
from ..prepare.prepared import PreparedData, is_prepared
from ..tokenizer import eos_token_id, load_tokenizer

CORPUS_DIR = Path(__file__).resolve().parents[1] / "corpus"
DOMAINS = ("code", "math", "legal", "drama", "scripture")
SPLITS = ("train", "heldout")


@dataclass(frozen=True)
class Source:
    """One data source: a bundled domain (``path is None``), a folder of prepared data
    (``bam prepare``), or a file or folder of files to read (``readers``)."""
    name: str
    path: Path | None = None

    def documents(self, split: str, tokenizer=None) -> list[str]:
        """The texts of ``split`` ("train" or "heldout"), in a fixed order: a bundled domain's as
        stored; a path's decoded from its prepared tokens (with ``tokenizer``, default the bundled
        BPE), one per document, the end-of-document token left out."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if self.path is not None:
            tokenizer = tokenizer if tokenizer is not None else load_tokenizer()
            data = self.prepared(tokenizer)
            toks, ends = data.tokens(split), data.doc_ends(split).astype(np.int64)
            eos = eos_token_id(tokenizer)
            out = []
            for a, b in zip(np.concatenate([[0], ends[:-1]]), ends):
                ids = toks[a:b].tolist()
                ids = ids[:-1] if ids and ids[-1] == eos else ids
                out.append(tokenizer.decode(ids, skip_special_tokens=False))
            return out
        with gzip.open(CORPUS_DIR / f"{self.name}.{split}.jsonl.gz", "rt", encoding="utf-8") as f:
            return [json.loads(line)["text"] for line in f]

    def prepared(self, tokenizer) -> PreparedData:
        """The source's tokens with ``tokenizer``: a prepared folder, opened (its tokenizer must be
        this one); a bundled domain or a path, prepared once into the cache (``bam_model.prepare.cached``).
        Resolved once per run (a bam command; ``forget_sources`` starts anew): a file that changes
        while a run goes on does not change its data."""
        key = (self, tokenizer_digest(tokenizer))
        if key not in _RESOLVED:
            _RESOLVED[key] = self._prepared(tokenizer)
        return _RESOLVED[key]

    def _prepared(self, tokenizer) -> PreparedData:
        if self.path is None:
            inputs = [Input(CORPUS_DIR / f"{self.name}.{split}.jsonl.gz", f"{self.name}.{split}", split)
                      for split in SPLITS]
            return cached(inputs, tokenizer, what=f"the bundled domain {self.name!r}")
        if is_prepared(self.path):
            data = open_prepared(self.path)
            data.check_tokenizer(tokenizer)
            return data
        return cached(list_inputs([self.path]), tokenizer, what=repr(self.name))


_RESOLVED: dict[tuple, PreparedData] = {}


def forget_sources() -> None:
    """Resolve every source afresh from now on (each ``bam`` command starts so: a command is a run)."""
    _RESOLVED.clear()


def parse_data_spec(spec: str) -> list[tuple[Source, float]]:
    """``"code"``, ``"code:0.25,math:0.75"``, ``"code,math"`` (equal weights) or a path ->
    [(source, weight)] with weights summing to 1. A path is a folder of prepared data, or a file or
    folder of files to read."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"data must be a domain, a mixture or a path, got {spec!r}")
    spec = spec.strip()
    if os.path.exists(spec):
        return [(_source(spec, spec), 1.0)]
    parts = [p.strip() for p in spec.split(",")]
    has_weight = [":" in p and not os.path.exists(p) for p in parts]
    if any(has_weight) and not all(has_weight):
        raise ValueError(f"data={spec!r}: give a weight to every part of a mixture or to none")
    sources, weights = [], []
    for part in parts:
        if not part:
            raise ValueError(f"data={spec!r}: empty mixture part")
        name, weight = part, 1.0
        if ":" in part and not os.path.exists(part):
            name, w = (s.strip() for s in part.rsplit(":", 1))
            try:
                weight = float(w)
            except ValueError:
                raise ValueError(f"data={spec!r}: weight {w!r} of {name!r} is not a number") from None
            if not (math.isfinite(weight) and weight > 0):
                raise ValueError(f"data={spec!r}: weight of {name!r} must be a positive number, got {w!r}")
        source = _source(name, spec)
        if source in sources:
            raise ValueError(f"data={spec!r}: {name!r} appears twice")
        sources.append(source)
        weights.append(weight)
    # Scaled by the largest first: weights as large as 1e308 would sum to infinity.
    largest = max(weights)
    weights = [w / largest for w in weights]
    total = sum(weights)
    return [(s, w / total) for s, w in zip(sources, weights)]


def _source(name: str, spec: str) -> Source:
    if name in DOMAINS:
        return Source(name)
    if os.path.exists(name):
        path = Path(name).resolve()
        if not (path.is_file() or path.is_dir()):
            raise ValueError(f"data={spec!r}: {name!r} is neither a file nor a folder")
        if not is_prepared(path):
            list_inputs([path])      # its files are listed (and their names checked) before any work
        return Source(name, path)
    raise ValueError(f"data={spec!r}: unknown domain {name!r}; expected one of {', '.join(DOMAINS)}, "
                     "a mixture like 'code:0.5,math:0.5', or a path (prepared data, or a file or folder)")
