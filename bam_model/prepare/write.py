"""Writing prepared data: a corpus tokenized into a staging folder (``write_prepared``), which
``prepare`` makes the content of the output folder."""
from __future__ import annotations

import hashlib
import itertools
import os
import time
from pathlib import Path

import numpy as np

from ..chat import ChatTemplate, token_mask
from ..files.atomic import file_record, sha256, write_json_atomic
from ..files.checks import check_output
from ..files.folders import write_folder
from ..readers import file_format
from ..tokenizer import eos_token_id
from .heldout import HELDOUT_FRACTION
from .index import DATA_FORMAT, DATA_VERSION, INDEX, SPLITS, token_dtype, tokenizer_digest
from .inputs import Input, list_inputs
from .pieces import document_pieces, in_batches, read_ahead
from .prepared import PreparedData
from .writer import SplitWriter, balance


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
    writers = {s: SplitWriter(folder, s, dtype) for s in SPLITS}
    n_text = 0
    started = time.perf_counter()
    bar = _progress(total_bytes if plain else None, progress)
    tokens_done = 0
    try:
        with read_ahead(in_batches(document_pieces(inputs, text_field, heldout, chat))) as batches:
            for batch in batches:
                keep = [p for p in batch if p[0] or p[2]]
                tokens_done += _write_batch(writers, keep, _encode_pieces(tokenizer, keep), eos)
                used = sum(p[3] for p in batch)
                n_text += sum(len(p[0].encode("utf-8", "surrogatepass")) for p in batch)
                bar.update(used)
                rate = tokens_done / max(time.perf_counter() - started, 1e-9)
                bar.set_postfix_str(f"{rate:,.0f} tokens/s", refresh=False)
    finally:
        bar.close()
        for w in writers.values():
            w.close()
    _finish_splits(writers, tokenizer, heldout)
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


def _write_batch(writers: dict[str, SplitWriter], pieces: list, encodings: list, eos: int) -> int:
    """Append the encoded ``pieces`` to their splits' files (EOS after each piece that ends a document;
    a loss mask once a conversation comes); returns how many tokens were written."""
    written = 0
    for split in SPLITS:
        mine = [(enc, p) for enc, p in zip(encodings, pieces) if p[1] == split]
        if not mine:
            continue
        lists = [enc.ids + [eos] if p[2] else enc.ids for enc, p in mine]
        lengths = np.fromiter(map(len, lists), dtype=np.int64, count=len(lists))
        ids = np.fromiter(itertools.chain.from_iterable(lists), dtype=writers[split].dtype,
                          count=int(lengths.sum()))
        ends = np.cumsum(lengths)[[p[2] for _, p in mine]]
        mask = None
        if any(p[4] is not None for _, p in mine):   # conversations: the assistant's tokens
            mask = np.concatenate([
                np.append(token_mask(enc.offsets, p[4]), np.uint8(0))[:n] if p[4] is not None
                else np.ones(n, dtype=np.uint8) for (enc, p), n in zip(mine, lengths)])
        writers[split].write(ids, ends, mask)
        written += len(ids)
    return written


def _finish_splits(writers: dict[str, SplitWriter], tokenizer, heldout: float) -> None:
    """Check the closed splits (no document left open, one at least), give both a loss mask or
    neither, and leave neither empty (``balance``)."""
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
    balance(writers, tokenizer, heldout)


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
