"""The training batch stream: seeded, resumable (``state_dict``) and shared across ranks."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..tokenizer import load_tokenizer
from .sources import SPLITS, parse_data_spec
from .splits import token_arrays
from .windows import check_int


@dataclass
class Batch:
    """input_ids, labels: [rows, seq_len] int64 (labels are the input ids: the model shifts them);
    source: [rows] int64, which source of the spec each row came from."""
    input_ids: torch.Tensor
    labels: torch.Tensor
    source: torch.Tensor


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
        check_int("seq_len", seq_len, 2)
        check_int("batch_size", batch_size, 1)
        check_int("seed", seed, 0)
        check_int("world_size", world_size, 1)
        check_int("rank", rank, 0)
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
