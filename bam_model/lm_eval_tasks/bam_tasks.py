"""Documents of the offline tasks: passages of the bundled held-out corpus, cut deterministically."""
from __future__ import annotations

import gzip
import json
import random
from pathlib import Path

CORPUS = Path(__file__).resolve().parent.parent / "corpus"
DOMAINS = ("code", "math", "legal", "drama", "scripture")
PER_DOMAIN = 40       # items per domain: enough to rank models, quick on a CPU
CONTEXT_CHARS = 320   # passage length before the continuation (cut back to a space)
CHOICE_CHARS = 64     # continuation length (cut back to a space)
CHOICES = 5
LINE_CHARS = 60       # bam_next_words: the rest of the line, when it is at most this long


def _texts(domain: str) -> list[str]:
    with gzip.open(CORPUS / f"{domain}.heldout.jsonl.gz", "rt", encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f if line.strip()]


def _cut(text: str, limit: int) -> str:
    """``text[:limit]`` cut back to its last space (the whole when it has none)."""
    head = text[:limit]
    space = head.rfind(" ")
    return head[:space] if space > limit // 2 else head


def _passages(domain: str, seed: int) -> list[tuple[str, str, str]]:
    """(context, continuation, rest of the line) triples, at most one per stretch of text, in a fixed
    random order."""
    rng = random.Random(f"{domain}-{seed}")
    span = CONTEXT_CHARS + CHOICE_CHARS
    pairs = []
    for text in _texts(domain):
        for start in range(0, len(text) - 2 * span, 4 * span):
            if start:  # begin at a word, not inside one
                start = next((i + 1 for i in range(start, start + span) if text[i].isspace()), start)
            context = _cut(text[start:], CONTEXT_CHARS)
            rest = text[start + len(context):]
            continuation = _cut(rest, CHOICE_CHARS)
            if context.strip() and continuation.strip():
                line = rest.split("\n", 1)[0] if "\n" in rest else ""  # only a line that ends
                pairs.append((context, continuation, line))
    rng.shuffle(pairs)
    return pairs


def continuation_docs(domain: str, seed: int = 0) -> list[dict]:
    """Multiple-choice items: ``context``, 5 ``choices`` (one true), ``label`` its index."""
    if domain not in DOMAINS:
        raise ValueError(f"domain must be one of {DOMAINS}, got {domain!r}")
    pairs = _passages(domain, seed)
    rng = random.Random(f"choices-{domain}-{seed}")
    items = pairs[:PER_DOMAIN]
    pool = [c for _, c, _ in pairs[PER_DOMAIN:]] or [c for _, c, _ in pairs]
    docs = []
    for i, (context, true, _) in enumerate(items):
        others = [c for c in rng.sample(pool, min(len(pool), 3 * CHOICES)) if c != true][:CHOICES - 1]
        choices = others[:]
        label = rng.randrange(len(choices) + 1)
        choices.insert(label, true)
        docs.append({"id": f"{domain}-{i}", "domain": domain, "context": context, "choices": choices,
                     "label": label})
    return docs


def next_words_docs(seed: int = 0, per_domain: int = 8) -> list[dict]:
    """generate_until items: ``context`` and the ``target``: the rest of its line in the source text
    (passages whose line is empty or longer than ``LINE_CHARS`` are left out)."""
    docs = []
    for domain in DOMAINS:
        lines = [(c, line) for c, _, line in _passages(domain, seed)
                 if line.strip() and len(line) <= LINE_CHARS]
        for i, (context, line) in enumerate(lines[:per_domain]):
            docs.append({"id": f"{domain}-{i}", "domain": domain, "context": context, "target": line})
    return docs


def _dataset(docs: list[dict]):
    import datasets  # noqa: PLC0415 (datasets: lm-eval's, optional)

    return datasets.DatasetDict({"test": datasets.Dataset.from_list(docs)})


def load_continuation(domain: str, **_):
    """lm-eval's ``custom_dataset`` hook for one domain of ``bam_continuation``."""
    return _dataset(continuation_docs(domain))


def load_next_words(**_):
    """lm-eval's ``custom_dataset`` hook of ``bam_next_words``."""
    return _dataset(next_words_docs())


def exact_line(doc: dict, results: list[str]) -> dict:
    """1 when the generated words equal the target line (spaces at the ends ignored)."""
    return {"exact_match": float(results[0].strip() == doc["target"].strip())}
