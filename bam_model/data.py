"""Data: the bundled corpus and tokenizer, ``--data`` specs, and a resumable, shardable batch stream.

A ``--data`` spec is a bundled domain (``code``), a mixture (``code:0.25,math:0.75``; weights are
normalised) or a path: a folder of prepared data (``bam prepare``), or a file or folder of files
(read by ``readers``: a text file is one document, a JSON Lines, JSON or Parquet file one document
per record, its ``text``); mixture parts may be paths too. How documents are held out:
``prepare``'s module doc.

Every source is tokenized once, into prepared data (``prepare``; a bundled domain or a raw path
into the cache, once per corpus and tokenizer), and mapped from there: documents joined by the
end-of-document token, cut into windows of ``seq_len`` tokens that overlap by one token, so that
with the model's own shift (labels are the input ids, as in Hugging Face) every token after the
first is predicted exactly once per pass. ``BatchStream`` draws windows in a seeded order that
depends only on the seed, the spec, ``seq_len`` and how many samples were drawn before, so it can
be saved (``state_dict``, plain JSON) and restored exactly, and split across ranks without loss or
overlap.
"""
from __future__ import annotations

import gzip
import hashlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import prepare
from .prepare import Input, PreparedData, _first_by_hash, _line_cut, _newline_tokens
from .tokenizer import eos_token_id, load_tokenizer

CORPUS_DIR = Path(__file__).resolve().parent / "corpus"
DOMAINS = ("code", "math", "legal", "drama", "scripture")
SPLITS = ("train", "heldout")
# The two parts of a source's training documents that weight-mixup training takes its two kinds of
# step from (``split_train``): "task" (the weights) and "mixup" (the mixing coefficients).
TRAIN_PARTS = ("task", "mixup")
HELDOUT_FRACTION = prepare.HELDOUT_FRACTION


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
        this one); a bundled domain or a path, prepared once into the cache (``prepare.cached``).
        Resolved once per run (a bam command; ``forget_sources`` starts anew): a file that changes
        while a run goes on does not change its data."""
        key = (self, prepare.tokenizer_digest(tokenizer))
        if key not in _RESOLVED:
            _RESOLVED[key] = self._prepared(tokenizer)
        return _RESOLVED[key]

    def _prepared(self, tokenizer) -> PreparedData:
        if self.path is None:
            inputs = [Input(CORPUS_DIR / f"{self.name}.{split}.jsonl.gz", f"{self.name}.{split}", split)
                      for split in SPLITS]
            return prepare.cached(inputs, tokenizer, what=f"the bundled domain {self.name!r}")
        if prepare.is_prepared(self.path):
            data = prepare.open_prepared(self.path)
            data.check_tokenizer(tokenizer)
            return data
        return prepare.cached(prepare.list_inputs([self.path]), tokenizer, what=repr(self.name))


_RESOLVED: dict[tuple, PreparedData] = {}


def forget_sources() -> None:
    """Resolve every source afresh from now on (each ``bam`` command starts so: a command is a run)."""
    _RESOLVED.clear()


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
    taken = _first_by_hash([_doc_key(d) for d in documents], [len(d) for d in documents], fraction)
    return ([d for i, d in enumerate(documents) if i not in taken],
            [d for i, d in enumerate(documents) if i in taken])


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
        if not prepare.is_prepared(path):
            prepare.list_inputs([path])      # its files are listed (and their names checked) before any work
        return Source(name, path)
    raise ValueError(f"data={spec!r}: unknown domain {name!r}; expected one of {', '.join(DOMAINS)}, "
                     "a mixture like 'code:0.5,math:0.5', or a path (prepared data, or a file or folder)")


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
        newline = _newline_tokens(tokenizer)
        task, mixup = split_train(docs, part[1],
                                  cut=lambda d, share: _line_cut(np.asarray(d), newline, share))
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


@dataclass
class Batch:
    """input_ids, labels: [rows, seq_len] int64 (labels are the input ids: the model shifts them);
    source: [rows] int64, which source of the spec each row came from."""
    input_ids: torch.Tensor
    labels: torch.Tensor
    source: torch.Tensor


def _check_int(name: str, value, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


class BatchStream:
    """An endless, deterministic stream of training batches from a ``--data`` spec.

    ``batch_size`` is the global batch (all ranks together); each rank's ``next()`` returns rows
    ``rank, rank + world_size, ...`` of it, so the ranks together see every sample exactly once.
    Sources are interleaved in proportion to their weights by a largest-deficit rule (every prefix
    of the stream holds each source's share to within one sample). Within a source, each epoch
    is a fresh random permutation of its windows, started at a random offset, seeded by
    ``(seed, source index, epoch)``.
    """

    def __init__(self, data: str, split: str = "train", *, seq_len: int, batch_size: int, seed: int = 0,
                 rank: int = 0, world_size: int = 1, tokenizer=None, part: tuple[str, float] | None = None):
        _check_int("seq_len", seq_len, 2)
        _check_int("batch_size", batch_size, 1)
        _check_int("seed", seed, 0)
        _check_int("world_size", world_size, 1)
        _check_int("rank", rank, 0)
        if rank >= world_size:
            raise ValueError(f"rank must be < world_size={world_size}, got {rank}")
        if batch_size % world_size:
            raise ValueError(f"batch_size={batch_size} must be a multiple of world_size={world_size}")
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        self.data, self.split, self.part = data, split, part          # part: checked by tokens()
        self.seq_len, self.batch_size, self.seed = seq_len, batch_size, seed
        self.rank, self.world_size = rank, world_size
        spec = parse_data_spec(data)
        self.sources = [s for s, _ in spec]
        self.weights = [w for _, w in spec]
        self.tokens, self.masks = (list(a) for a in
                                   zip(*(token_arrays(s, split, tokenizer, part) for s in self.sources)))
        self.vocab_size = (tokenizer if tokenizer is not None else load_tokenizer()).get_vocab_size()
        for s, t in zip(self.sources, self.tokens):
            if len(t) < seq_len:
                what = (f"{split} tokens" if part is None else
                        f"tokens in the {part[0]} part of its training documents (mixup split {part[1]:g})")
                raise ValueError(f"data={data!r}: {s.name!r} has {len(t)} {what}, fewer than "
                                 f"seq_len={seq_len}")
        self.position = 0                           # samples drawn, all ranks together
        self.draws = [0] * len(self.sources)        # samples drawn from each source
        self.epoch = [0] * len(self.sources)
        self.index = [0] * len(self.sources)        # next window within the current epoch
        self._starts: dict[int, tuple[int, np.ndarray]] = {}

    def _epoch_starts(self, s: int) -> np.ndarray:
        epoch = self.epoch[s]
        if s not in self._starts or self._starts[s][0] != epoch:
            L, n_tok = self.seq_len, len(self.tokens[s])
            rng = np.random.default_rng([self.seed, s, epoch])
            offset = int(rng.integers(0, min(L - 1, n_tok - L + 1)))
            n = (n_tok - offset - 1) // (L - 1)
            self._starts[s] = (epoch, offset + (L - 1) * rng.permutation(n))
        return self._starts[s][1]

    def _draw(self) -> tuple[int, int]:
        """The next sample of the global stream: (source index, window start)."""
        deficits = [w * (self.position + 1) - d for w, d in zip(self.weights, self.draws)]
        s = max(range(len(deficits)), key=lambda i: (deficits[i], -i))
        starts = self._epoch_starts(s)
        start = int(starts[self.index[s]])
        self.index[s] += 1
        if self.index[s] == len(starts):
            self.epoch[s] += 1
            self.index[s] = 0
        self.draws[s] += 1
        self.position += 1
        return s, start

    def __iter__(self):
        return self

    def __next__(self) -> Batch:
        rows, masks, src = [], [], []
        for row in range(self.batch_size):
            s, start = self._draw()
            if row % self.world_size == self.rank:
                rows.append(self.tokens[s][start:start + self.seq_len])
                mask = self.masks[s]
                masks.append(mask[start:start + self.seq_len] if mask is not None else None)
                src.append(s)
        input_ids = torch.from_numpy(np.stack(rows).astype(np.int64))
        if int(input_ids.max()) >= self.vocab_size:    # prepared files changed behind their index
            s = src[int(input_ids.max(1).values.argmax())]
            raise ValueError(f"data: {self.sources[s].name!r} holds token id {int(input_ids.max())}, beyond "
                             f"the tokenizer's {self.vocab_size:,} tokens; prepare it again")
        labels = input_ids.clone()
        if any(m is not None for m in masks):      # conversations: only the assistant's tokens are targets
            keep = np.stack([m if m is not None else np.ones(self.seq_len, np.uint8) for m in masks])
            labels[torch.from_numpy(keep == 0)] = -100
        return Batch(input_ids=input_ids, labels=labels, source=torch.tensor(src, dtype=torch.int64))

    def _config(self) -> dict:
        config = {"data": self.data, "split": self.split, "seq_len": self.seq_len, "seed": self.seed,
                  "sources": [s.name for s in self.sources], "weights": self.weights}
        if self.part is not None:
            config["part"] = list(self.part)
        return config

    def state_dict(self) -> dict:
        """The stream's position as plain JSON-able values (the same on every rank)."""
        return {**self._config(), "position": self.position, "draws": list(self.draws),
                "epoch": list(self.epoch), "index": list(self.index)}

    def load_state_dict(self, state: dict) -> None:
        """Continue from ``state``; raises ValueError if it was saved by a different stream."""
        if not isinstance(state, dict):
            raise ValueError(f"state must be a dict from BatchStream.state_dict, got {type(state).__name__}")
        # "part" is checked even when this stream has none: a whole-split stream does not take the
        # position of a part's stream.
        for key, value in {"part": None, **self._config()}.items():
            if state.get(key) != value:
                raise ValueError(f"state: {key}={state.get(key)!r} was saved, this stream has {value!r}")
        n = len(self.sources)
        for key in ("draws", "epoch", "index"):
            v = state.get(key)
            if not (isinstance(v, list) and len(v) == n and all(isinstance(x, int) and x >= 0 for x in v)):
                raise ValueError(f"state: {key} must be a list of {n} ints >= 0, got {v!r}")
        if not isinstance(state.get("position"), int) or state["position"] != sum(state["draws"]):
            raise ValueError(f"state: position must equal the sum of draws, got {state.get('position')!r}")
        self.position = state["position"]
        self.draws, self.epoch, self.index = list(state["draws"]), list(state["epoch"]), list(state["index"])
        for s in range(n):
            if self.index[s] >= len(self._epoch_starts(s)):
                raise ValueError(f"state: index {self.index[s]} is past the end of epoch {self.epoch[s]} "
                                 f"of {self.sources[s].name!r}")


def eval_window_count(n_tokens: int, seq_len: int, max_windows: int | None = None) -> int:
    """How many windows ``eval_windows`` cuts from ``n_tokens`` tokens (at most ``max_windows``)."""
    _check_int("seq_len", seq_len, 2)
    n = (n_tokens - 1) // (seq_len - 1)
    if max_windows is not None:
        _check_int("max_windows", max_windows, 1)
        n = min(n, max_windows)
    if n == 0:
        raise ValueError(f"seq_len={seq_len} is longer than the {n_tokens} tokens to evaluate")
    return n


def scored_windows(n_tokens: int, mask: np.ndarray | None, seq_len: int, max_windows: int | None = None
                   ) -> np.ndarray:
    """The indices of the windows of ``eval_windows`` that are scored: all of them (at most
    ``max_windows``); with a loss ``mask`` (conversations), those holding a target after their first
    token, the first ``max_windows`` of them."""
    if mask is None:
        return np.arange(eval_window_count(n_tokens, seq_len, max_windows))
    n = eval_window_count(n_tokens, seq_len)
    step = seq_len - 1
    # A window w scores tokens w*step + 1 .. w*step + step: whether any is a target, from a running sum.
    ends = np.concatenate([[0], np.cumsum(np.asarray(mask[:n * step + 1], dtype=np.int64))])
    starts = np.arange(n) * step
    has = ends[starts + step + 1] - ends[starts + 1] > 0
    chosen = np.nonzero(has)[0]
    if not len(chosen):
        raise ValueError("no held-out window holds a token in the loss (the conversations' assistant turns)")
    return chosen[:max_windows] if max_windows is not None else chosen


def eval_rows(tok: np.ndarray, mask: np.ndarray | None, windows: np.ndarray, seq_len: int
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """The windows ``windows`` (indices) of ``eval_windows(tok, seq_len)`` [len, seq_len] int64, and
    their labels: the same, with -100 where ``mask`` (the source's ``loss_mask``) leaves a token out
    of the loss. Read from ``tok`` (a memory map) a batch at a time."""
    idx = np.asarray(windows)[:, None] * (seq_len - 1) + np.arange(seq_len)[None, :]
    ids = torch.from_numpy(np.asarray(tok[idx]).astype(np.int64))
    labels = ids.clone()
    if mask is not None:
        labels[torch.from_numpy(np.asarray(mask[idx]) == 0)] = -100
    return ids, labels


def eval_windows(tok: np.ndarray, seq_len: int, max_windows: int | None = None) -> torch.Tensor:
    """[N, seq_len] int64: consecutive windows from the start of ``tok``, overlapping by one token,
    so that every token after the first (up to the last full window) is predicted exactly once."""
    n = eval_window_count(len(tok), seq_len, max_windows)
    return eval_rows(tok, None, np.arange(n), seq_len)[0]
