"""bam-bench data: tokenizing a corpus once, and starting to train on it (CPU work: the device
argument is not used).

Rows (the corpus: JSON Lines of the bundled documents, each copy prefixed so no two are alike;
the bundled BPE; the tokenizer's threads: every core, for both providers):
  prepare S / encode_batch   the tokenizer's own ``encode_batch`` on the same texts, already in
                             memory, in batches of the size bam prepare uses: the upper bound
  prepare S / bam prepare    the whole ``bam prepare`` command in a process of its own (start-up,
                             reading, tokenizing, writing, hashing), with that process's peak RSS
  first step, S prepared / bam train   ``bam train --steps 1`` on a prepared folder: from the
                             command's start to its first step line, with the process's peak RSS
  first step, S raw jsonl (cold / cached)   the same on the JSON Lines file itself: the first run
                             prepares it into the cache, the second opens the cache
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from bam_model import DenseConfig, DenseLM
from bam_model import data as D
from bam_model import prepare as P
from bam_model.prepare import BATCH_BYTES

MB = 10**6
FULL = {"throughput": 100 * MB, "start": (10 * MB, 1000 * MB)}
QUICK = {"throughput": 10 * MB, "start": (10 * MB, 50 * MB)}
BAM = [sys.executable, "-m", "bam_model.cli"]


def _size(n: int) -> str:
    return f"{n / 1e9:.0f} GB" if n >= 10**9 else f"{n / MB:.0f} MB"


def _write_corpus(path: Path, size: int) -> int:
    """JSON Lines of the bundled documents, copy after copy, until ``size`` bytes; returns the bytes."""
    docs = [d for name in D.DOMAINS for d in D.Source(name).documents("train")]
    written, copy = 0, 0
    with open(path, "w", encoding="utf-8") as f:
        while written < size:
            for d in docs:
                line = json.dumps({"text": f"[{copy}] {d}"}) + "\n"
                f.write(line)
                written += len(line.encode())
                if written >= size:
                    break
            copy += 1
    return written


def _texts(path: Path) -> list[str]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f]


def _peak_rss(pid: int, peak: list, done: threading.Event) -> None:
    """Follow the process's own high-water mark of resident memory (``VmHWM``, which starts afresh at
    its exec; ``getrusage``'s ``ru_maxrss`` of a child would carry the parent's size at the fork)."""
    while not done.is_set():
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        peak[0] = max(peak[0], int(line.split()[1]))
        except OSError:
            return
        done.wait(0.02)


def _run(argv: list[str], env: dict, until: str | None = None) -> dict:
    """Run ``argv``; its wall time, the time to the first stderr line starting with ``until``, and
    its peak RSS. Raises on a non-zero exit."""
    start = time.perf_counter()
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    peak, done = [0], threading.Event()
    watcher = threading.Thread(target=_peak_rss, args=(proc.pid, peak, done), daemon=True)
    watcher.start()
    first, err = None, []
    for line in proc.stderr:
        err.append(line)
        if first is None and until is not None and line.startswith(until):
            first = time.perf_counter() - start
    proc.wait()
    wall = time.perf_counter() - start
    done.set()
    watcher.join()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv[2:4])} failed ({proc.returncode}): {''.join(err)[-500:]}")
    return {"wall": wall, "first": first, "rss_mib": peak[0] / 1024}


def check(device: str):
    """A small prepared corpus holds exactly the tokenizer's tokens of its documents."""
    tok = D.load_tokenizer()
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "c.jsonl"
        _write_corpus(src, 300_000)
        data = P.prepare([src], tok, Path(tmp) / "out", progress=False)
        texts = _texts(src)
        eos = D.eos_token_id(tok)
        got = sorted(tuple(x) for x in _split_docs(data.tokens("train"), data.doc_ends("train"))) + \
            sorted(tuple(x) for x in _split_docs(data.tokens("heldout"), data.doc_ends("heldout")))
        want = [(*e.ids, eos) for e in tok.encode_batch(texts, add_special_tokens=False)]
        ok = sorted(got) == sorted(want)
        yield f"{'ok' if ok else 'FAIL'} prepared tokens of {len(texts)} documents equal encode_batch's"


def _split_docs(tokens, ends):
    starts = np.concatenate([[0], ends[:-1]]).astype(np.int64)
    return [tokens[a:b].tolist() for a, b in zip(starts, ends.astype(np.int64))]


def run(device: str, quick: bool):
    sizes = QUICK if quick else FULL
    threads = os.cpu_count() or 1
    root = Path(tempfile.mkdtemp(prefix="bam-bench-data-", dir=os.environ.get("BAM_BENCH_TMP")))
    env = {**os.environ, "BAM_DATA_CACHE": str(root / "cache"), "RAYON_NUM_THREADS": str(threads)}
    os.environ["RAYON_NUM_THREADS"] = str(threads)   # the pool of this process: read at its first use
    try:
        yield from _throughput(root, env, sizes["throughput"], threads)
        yield from _start_up(root, env, sizes["start"], threads)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _prepare_argv(src: Path, out: Path, threads: int) -> list[str]:
    """``bam prepare`` of ``src`` into ``out`` with the bundled BPE, on ``threads`` threads."""
    return [*BAM, "prepare", str(src), "--tokenizer", str(D.CORPUS_DIR / "tokenizer.json"), "--out", str(out),
            "--no-progress", "--workers", str(threads)]


def _throughput(root: Path, env: dict, n: int, threads: int):
    """Tokenizing a corpus of ``n`` bytes: the tokenizer alone, then the whole command."""
    src = root / "throughput.jsonl"
    nbytes = _write_corpus(src, n)
    texts = _texts(src)
    tok = D.load_tokenizer()
    batches, batch, size = [], [], 0
    for t in texts:
        batch.append(t)
        size += len(t)
        if size >= BATCH_BYTES:
            batches.append(batch)
            batch, size = [], 0
    batches.append(batch)
    start = time.perf_counter()
    for b in batches:
        tok.encode_batch(b, add_special_tokens=False)
    seconds = time.perf_counter() - start
    del texts, batches
    case = f"prepare {_size(nbytes)} jsonl, {threads} threads"
    yield {"case": case, "provider": "encode_batch (in memory)", "ms": seconds * 1e3,
           "mbps": nbytes / MB / seconds}
    r = _run(_prepare_argv(src, root / "p-throughput", threads), env)
    yield {"case": case, "provider": "bam prepare (whole command)", "ms": r["wall"] * 1e3,
           "mbps": nbytes / MB / r["wall"], "rss_mib": r["rss_mib"]}
    src.unlink()
    shutil.rmtree(root / "p-throughput")


def _start_up(root: Path, env: dict, corpus_sizes: tuple[int, ...], threads: int):
    """Start-up: a tiny model, one step, on a prepared corpus of each size; on the smallest also on
    its JSON Lines file, cold (prepared into the cache) and cached."""
    model = root / "model"
    cfg = DenseConfig(vocab_size=D.load_tokenizer().get_vocab_size(), dim=64, n_layers=2, n_heads=4,
                      n_kv_heads=2, ffn_dim=128, max_seq_len=128, tie_embeddings=True, eos_token_id=0)
    DenseLM(cfg).save_pretrained(str(model))
    train = ["--steps", "1", "--batch-size", "4", "--seq-len", "128", "--eval-windows", "1", "--no-progress"]
    for n in corpus_sizes:
        src = root / f"c{n}.jsonl"
        nbytes = _write_corpus(src, n)
        prepared = root / f"p{n}"
        r = _run(_prepare_argv(src, prepared, threads), env)
        yield {"case": f"prepare {_size(nbytes)} jsonl, {threads} threads",
               "provider": "bam prepare (whole command)", "ms": r["wall"] * 1e3,
               "mbps": nbytes / MB / r["wall"], "rss_mib": r["rss_mib"]}
        os.sync()   # the prepared files on disk: their writeback is not timed as the run's start-up
        r = _run([*BAM, "train", str(model), "--data", str(prepared), "--out", str(root / f"run{n}"), *train],
                 env, until="train: step 1/")
        yield {"case": f"first step, {_size(nbytes)} corpus", "provider": "bam train on the prepared folder",
               "ms": r["first"] * 1e3, "rss_mib": r["rss_mib"]}
        if n == min(corpus_sizes):
            for label in ("cold: prepares into the cache", "cached"):
                out = root / f"raw{n}-{label[:4]}"
                r = _run([*BAM, "train", str(model), "--data", str(src), "--out", str(out), *train], env,
                         until="train: step 1/")
                yield {"case": f"first step, {_size(nbytes)} corpus",
                       "provider": f"bam train on the jsonl ({label})", "ms": r["first"] * 1e3,
                       "rss_mib": r["rss_mib"]}
        src.unlink()
        shutil.rmtree(prepared)
