import gzip
import json

import numpy as np
import pytest
import torch

from bam_model import data as D


def _docs(domain, split):
    with gzip.open(D.CORPUS_DIR / f"{domain}.{split}.jsonl.gz", "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


@pytest.mark.parametrize("domain", D.DOMAINS)
def test_corpus_present_with_disjoint_splits(domain):
    train, held = _docs(domain, "train"), _docs(domain, "heldout")
    train_bytes = sum(len(d["text"].encode()) for d in train)
    held_bytes = sum(len(d["text"].encode()) for d in held)
    assert 800_000 < train_bytes < 1_200_000
    assert 0.05 < held_bytes / (train_bytes + held_bytes) < 0.2
    assert len(held) >= 5
    assert not {d["id"] for d in train} & {d["id"] for d in held}
    assert not {d["text"] for d in train} & {d["text"] for d in held}
    assert all(d["id"].startswith(f"{domain}:") and d["text"].strip() for d in train + held)
    assert f"`{domain}`" in (D.CORPUS_DIR / "SOURCES.md").read_text()


def test_math_proofs_are_stripped():
    text = "".join(d["text"] for d in _docs("math", "heldout"))
    assert "$p" in text and "$= $." in text
    assert "$= (" not in text


def test_tokenizer_round_trips_text():
    tok = D.load_tokenizer()
    assert tok.get_vocab_size() == 8192
    assert D.eos_token_id(tok) == 0
    lengths = D.token_byte_lengths(tok)
    samples = [d["text"][:3000] for domain in D.DOMAINS for d in _docs(domain, "heldout")[:2]]
    samples.append("  tabs\tand  spaces\n\n\nünïcödé ∀x ∈ ℝ, 日本語 🙂 \x00\x7f")
    for text in samples:
        ids = tok.encode(text, add_special_tokens=False).ids
        assert tok.decode(ids) == text
        assert int(lengths[ids].sum()) == len(text.encode("utf-8"))
    assert lengths[0] == 0


def test_tokens_separate_documents_with_eos():
    tok = D.load_tokenizer()
    src = D.Source("legal")
    arr = D.tokens(src, "heldout", tok)
    assert arr.dtype == np.uint16
    assert int((arr == D.eos_token_id(tok)).sum()) == len(src.documents("heldout"))
    assert arr[-1] == D.eos_token_id(tok)
    assert D.tokens(src, "heldout", tok) is arr


def test_parse_data_spec(tmp_path):
    [(s, w)] = D.parse_data_spec("code")
    assert s == D.Source("code") and w == 1.0
    spec = D.parse_data_spec("code:0.25, math:0.25,legal:1")
    assert [s.name for s, _ in spec] == ["code", "math", "legal"]
    assert [w for _, w in spec] == pytest.approx([1 / 6, 1 / 6, 2 / 3])
    assert [w for _, w in D.parse_data_spec("drama,scripture")] == [0.5, 0.5]
    f = tmp_path / "notes.txt"
    f.write_text("hello\n")
    [(s, w)] = D.parse_data_spec(str(f))
    assert s.path == f.resolve() and w == 1.0
    mixed = D.parse_data_spec(f"{tmp_path}:3,code:1")
    assert mixed[0][0].path == tmp_path.resolve() and mixed[0][1] == 0.75


@pytest.mark.parametrize("spec, match", [
    ("", "data must be"),
    ("prose", "unknown domain 'prose'"),
    ("code:abc", "weight 'abc' of 'code' is not a number"),
    ("code:0", "weight of 'code' must be a positive number"),
    ("code:-1,math:2", "weight of 'code' must be a positive"),
    ("code:nan", "positive number"),
    ("code:0.5,math", "give a weight to every part"),
    ("code,,math", "empty mixture part"),
    ("code:1,code:2", "'code' appears twice"),
    ("/no/such/folder", "unknown domain '/no/such/folder'"),
])
def test_bad_data_specs_name_the_argument(spec, match):
    with pytest.raises(ValueError, match=match) as e:
        D.parse_data_spec(spec)
    assert str(e.value).startswith("data")


def test_folder_and_file_sources_split_by_document(tmp_path):
    rng = np.random.default_rng(0)
    for i in range(12):
        sub = tmp_path / ("a" if i % 2 else "b")
        sub.mkdir(exist_ok=True)
        words = map(str, rng.integers(0, 1000, 200 + 37 * i))
        (sub / f"doc{i}.txt").write_text(" ".join(words) + f" END{i}\n")
    (tmp_path / ".hidden").write_text("never read\n")
    src = D.Source("folder", tmp_path)
    train, held = src.documents("train"), src.documents("heldout")
    assert len(train) + len(held) == 12 and held and train
    assert not set(train) & set(held)
    assert all("never read" not in d for d in train + held)
    assert src.documents("heldout") == held

    lone = tmp_path / "a" / "doc1.txt"
    lone.write_text("".join(f"line {i}\n" for i in range(100)))
    [(one, _)] = D.parse_data_spec(str(lone))
    tr, [ho] = one.documents("train"), one.documents("heldout")
    assert tr[0] + ho == lone.read_text() and ho.startswith("line 90\n")

    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"\xff\xfe\x00binary")
    with pytest.raises(ValueError, match="not UTF-8"):
        D.Source("bad", bad).documents("train")
    with pytest.raises(ValueError, match="split must be one of"):
        src.documents("test")


def _batches(stream, n):
    return [next(stream) for _ in range(n)]


def test_stream_is_deterministic_and_seedable():
    kw = dict(seq_len=33, batch_size=6)
    a = _batches(D.BatchStream("code:0.5,math:0.5", seed=3, **kw), 4)
    b = _batches(D.BatchStream("code:0.5,math:0.5", seed=3, **kw), 4)
    c = _batches(D.BatchStream("code:0.5,math:0.5", seed=4, **kw), 4)
    for x, y in zip(a, b):
        assert torch.equal(x.input_ids, y.input_ids) and torch.equal(x.source, y.source)
        assert torch.equal(x.labels, x.input_ids) and x.input_ids.dtype == torch.int64
    assert x.input_ids.shape == (6, 33)
    assert not all(torch.equal(x.input_ids, z.input_ids) for x, z in zip(a, c))


def test_stream_mixture_proportions_are_exact():
    stream = D.BatchStream("code:0.75,legal:0.25", seq_len=17, batch_size=8)
    for batch in _batches(stream, 5):
        assert batch.source.tolist().count(0) == 6
    assert stream.draws == [30, 10] and stream.position == 40


def test_stream_state_save_and_restore():
    make = lambda: D.BatchStream("math:0.3,drama:0.7", seq_len=40, batch_size=5, seed=7)
    a = make()
    _batches(a, 3)
    state = json.loads(json.dumps(a.state_dict()))
    rest = _batches(a, 4)
    b = make()
    b.load_state_dict(state)
    for x, y in zip(rest, _batches(b, 4)):
        assert torch.equal(x.input_ids, y.input_ids)
    other = D.BatchStream("math:0.3,drama:0.7", seq_len=40, batch_size=5, seed=8)
    with pytest.raises(ValueError, match="seed=7 was saved"):
        other.load_state_dict(state)
    with pytest.raises(ValueError, match="position must equal"):
        make().load_state_dict({**state, "position": state["position"] + 1})


def _tiny_text_source(tmp_path, n_words=300):
    f = tmp_path / "tiny.txt"
    rng = np.random.default_rng(1)
    f.write_text(" ".join(f"w{x}" for x in rng.integers(0, 50, n_words)) + "\n")
    return str(f)


def test_epochs_visit_every_window_once(tmp_path):
    path = _tiny_text_source(tmp_path)
    L = 9
    stream = D.BatchStream(path, seq_len=L, batch_size=4, seed=2)
    tok = stream.tokens[0]
    first_epoch = stream._epoch_starts(0)
    n = len(first_epoch)
    assert n > 10
    rows = torch.cat([b.input_ids for b in _batches(stream, -(-2 * n // 4))])
    starts = sorted(first_epoch.tolist())
    assert np.all(np.diff(starts) == L - 1) and starts[-1] + L <= len(tok)
    epoch0 = {tuple(r.tolist()) for r in rows[:n]}
    assert epoch0 == {tuple(tok[s:s + L].tolist()) for s in starts}
    assert stream.epoch[0] >= 1
    assert not torch.equal(rows[:n], rows[n:2 * n])


@pytest.mark.parametrize("world_size", [2, 3])
def test_sharding_covers_each_sample_exactly_once(tmp_path, world_size):
    path = _tiny_text_source(tmp_path)
    spec = f"{path}:0.5,scripture:0.5"
    B, steps = 6, 12     # enough to wrap the tiny source's epoch
    full = _batches(D.BatchStream(spec, seq_len=9, batch_size=B, seed=5), steps)
    shards = [_batches(D.BatchStream(spec, seq_len=9, batch_size=B, seed=5, rank=r, world_size=world_size),
                       steps)
              for r in range(world_size)]
    for step in range(steps):
        merged = torch.empty_like(full[step].input_ids)
        for r in range(world_size):
            rows = shards[r][step].input_ids
            assert rows.shape[0] == B // world_size
            merged[r::world_size] = rows
        assert torch.equal(merged, full[step].input_ids)
    with pytest.raises(ValueError, match="batch_size=5 must be a multiple of world_size=2"):
        D.BatchStream("code", seq_len=9, batch_size=5, world_size=2)
    with pytest.raises(ValueError, match="rank must be < world_size"):
        D.BatchStream("code", seq_len=9, batch_size=4, rank=2, world_size=2)


def test_stream_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="seq_len must be an int >= 2"):
        D.BatchStream("code", seq_len=1, batch_size=2)
    with pytest.raises(ValueError, match="fewer than seq_len=5000"):
        D.BatchStream(_tiny_text_source(tmp_path), seq_len=5000, batch_size=2)
    with pytest.raises(ValueError, match="split must be one of"):
        D.BatchStream("code", "valid", seq_len=8, batch_size=2)


def test_eval_windows_score_each_token_once():
    tok = np.arange(100, dtype=np.uint16)
    w = D.eval_windows(tok, 10)
    assert w.shape == (11, 10)
    assert torch.equal(w[:, 1:].flatten(), torch.arange(1, 100))
    assert D.eval_windows(tok, 10, max_windows=3).shape == (3, 10)
    with pytest.raises(ValueError, match="seq_len=200 is longer"):
        D.eval_windows(tok, 200)


def test_record_files_are_read_by_their_text_field_and_split_by_document(tmp_path):
    """A JSON Lines file (gzip here) is its records' texts, not its raw JSON: a lone file is held
    out by a hash of each record's text; in a folder, record and text files are held out whole."""
    records = [{"text": f"document {i}: " + "word " * (20 + i), "meta": i} for i in range(40)]
    path = tmp_path / "corpus.jsonl.gz"
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write("".join(json.dumps(r) + "\n" for r in records))
    [(src, _)] = D.parse_data_spec(str(path))
    train, held = src.documents("train"), src.documents("heldout")
    assert sorted(train + held) == sorted(r["text"] for r in records) and held and train
    assert train == [r["text"] for r in records if r["text"] in train]          # in file order
    tok = D.load_tokenizer()
    eos = D.eos_token_id(tok)
    expected = [i for d in train for i in (*tok.encode(d, add_special_tokens=False).ids, eos)]
    assert D.tokens(src, "train", tok).tolist() == expected

    folder = tmp_path / "folder"
    folder.mkdir()
    for j in range(5):
        with open(folder / f"part{j}.jsonl", "w") as f:
            f.write("".join(json.dumps({"text": f"part {j} record {i} " + "x " * 30}) + "\n"
                            for i in range(3)))
    (folder / "notes.md").write_text("a text file is one document\n")
    src = D.Source("folder", folder)
    train, held = src.documents("train"), src.documents("heldout")
    assert len(train) + len(held) == 16 and held and train and not set(train) & set(held)
    assert "a text file is one document\n" in train + held

    (folder / "part9.jsonl").write_text('{"text": "fine"}\n{"body": "no text"}\n')
    D._RESOLVED.clear()            # a source is resolved once per process: as a new run
    with pytest.raises(ValueError, match=r"part9.jsonl' line 2 has no 'text' field"):
        [d for split in ("train", "heldout") for d in D.Source("folder", folder).documents(split)]
