"""Prepared data (bam_model/prepare/, ``bam prepare``): every format tokenized once into flat
token files with a document index, the held-out split by document, the cache raw paths and the
bundled corpus go through, and every bad input one line with nothing half-written."""
import gzip
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from bam_model import DenseConfig, DenseLM, files
from bam_model import data as D
from bam_model import prepare as P
from bam_model.cli import main
from bam_model.tokenizer import BUNDLED_TOKENIZER, read_tokenizer
from tests.model.test_reliability import _on_full_disk, needs_namespaces

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}


@pytest.fixture(scope="module")
def tok():
    return D.load_tokenizer()


@pytest.fixture(scope="module")
def docs():
    return D.Source("code").documents("train")[:40] + D.Source("math").documents("train")[:40]


def decoded(data: P.PreparedData, split: str, tok) -> list[str]:
    toks, ends = data.tokens(split), data.doc_ends(split).astype(np.int64)
    out = []
    for a, b in zip(np.concatenate([[0], ends[:-1]]), ends):
        ids = toks[a:b].tolist()
        out.append(tok.decode(ids[:-1] if ids[-1] == D.eos_token_id(tok) else ids, skip_special_tokens=False))
    return out


def test_every_record_format_gives_the_documents_tokens_split_by_document(tmp_path, tok, docs):
    """jsonl, json.gz and parquet (another text field) hold the same records: each prepares to the
    same documents, each one's tokens being the tokenizer's own followed by EOS; the splits
    partition the documents, about 10% held out, the same way every time."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": d, "n": i}) + "\n\n"
                                              for i, d in enumerate(docs)))
    with gzip.open(tmp_path / "b.json.gz", "wt") as f:
        json.dump([{"text": d} for d in docs], f)
    pq.write_table(pa.table({"body": docs}), tmp_path / "c.parquet", row_group_size=7)
    eos = D.eos_token_id(tok)
    indexes = []
    for name, field in (("a.jsonl", "text"), ("b.json.gz", "text"), ("c.parquet", "body")):
        data = P.prepare([tmp_path / name], tok, tmp_path / f"out-{name}", text_field=field, progress=False)
        train, held = decoded(data, "train", tok), decoded(data, "heldout", tok)
        assert sorted(train + held) == sorted(docs) and train and held
        assert [d for d in docs if d in held] == held                      # in file order
        assert [d for d in docs if d in train] == train
        assert 0.02 < sum(map(len, held)) / sum(map(len, docs)) < 0.3
        want = [i for d in held for i in (*tok.encode(d, add_special_tokens=False).ids, eos)]
        assert data.tokens("heldout").tolist() == want and data.tokens("train").dtype == np.uint16
        indexes.append(data.index)
        assert data.index["sources"][0]["sha256"] == files.sha256(tmp_path / name)
    splits = [{s: i["splits"][s]["files"][f"{s}.tokens"]["sha256"] for s in P.SPLITS} for i in indexes]
    assert splits[0] == splits[1] == splits[2]
    # A copy of a document lands beside its original: records are held out by their text.
    doubled = tmp_path / "doubled.jsonl"
    doubled.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs + docs[:10]))
    data = P.prepare([doubled], tok, tmp_path / "out-doubled", progress=False)
    held = decoded(data, "heldout", tok)
    assert all((d in held) == (held.count(d) == 2) for d in docs[:10])


def test_datasets_folders_and_zstandard_files(tmp_path, tok, docs):
    """A ``datasets`` folder (``save_to_disk``) reads its Arrow files; a DatasetDict keeps its train
    and validation splits; .jsonl.zst reads as .jsonl."""
    import datasets
    import zstandard

    datasets.Dataset.from_dict({"text": docs, "n": list(range(len(docs)))}).save_to_disk(tmp_path / "ds")
    data = P.prepare([tmp_path / "ds"], tok, tmp_path / "out-ds", progress=False)
    assert sorted(decoded(data, "train", tok) + decoded(data, "heldout", tok)) == sorted(docs)
    assert [s["key"].split("/")[-1] for s in data.index["sources"]] == ["data-00000-of-00001.arrow"]
    splits = {"train": docs[:60], "validation": docs[60:]}
    datasets.DatasetDict({name: datasets.Dataset.from_dict({"body": texts}) for name, texts in splits.items()}
                         ).save_to_disk(tmp_path / "dd")
    data = P.prepare([tmp_path / "dd"], tok, tmp_path / "out-dd", text_field="body", progress=False)
    assert decoded(data, "train", tok) == docs[:60] and decoded(data, "heldout", tok) == docs[60:]
    raw = "".join(json.dumps({"text": d}) + "\n" for d in docs).encode()
    half = raw.index(b"\n", len(raw) // 2) + 1        # two frames, one after the other (as zstd -c a b)
    (tmp_path / "c.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(raw[:half])
                                           + zstandard.ZstdCompressor().compress(raw[half:]))
    (tmp_path / "c.jsonl").write_bytes(raw)
    zst = P.prepare([tmp_path / "c.jsonl.zst"], tok, tmp_path / "out-zst", progress=False)
    plain = P.prepare([tmp_path / "c.jsonl"], tok, tmp_path / "out-plain", progress=False)
    assert zst.digest == plain.digest
    (tmp_path / "cut.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(raw)[:-50])
    with pytest.raises(ValueError, match="is not a complete Zstandard file"):
        P.prepare([tmp_path / "cut.jsonl.zst"], tok, tmp_path / "out-cut", progress=False)
    assert not (tmp_path / "out-cut").exists()


def test_text_files_one_document_each_long_ones_read_in_pieces(tmp_path, tok, docs, monkeypatch):
    """A text file is one document, read in pieces (here of 4 KiB) cut after line breaks, .gz too;
    text files are held out whole. A lone text file is cut near 90% after a line break."""
    from bam_model import readers

    monkeypatch.setattr(readers, "TEXT_PIECE", 4096)
    folder = tmp_path / "texts"
    (folder / "sub").mkdir(parents=True)
    texts = {f"sub/t{i}.txt": "\n".join(docs[4 * i:4 * i + 4]) for i in range(8)}
    for name, text in texts.items():
        (folder / name).write_text(text)
    (folder / "sub" / "t7.txt").unlink()
    with gzip.open(folder / "z.md.gz", "wt") as f:
        f.write(texts.pop("sub/t7.txt"))
    texts["z.md.gz"] = "\n".join(docs[28:32])
    (folder / ".hidden").write_text("never read")
    data = P.prepare([folder], tok, tmp_path / "out", progress=False)
    train, held = decoded(data, "train", tok), decoded(data, "heldout", tok)
    assert sorted(train + held) == sorted(texts.values()) and len(held) >= 1 and len(train) >= 1
    assert data.index["splits"]["train"]["documents"] + data.index["splits"]["heldout"]["documents"] == 8
    # One long text file (many pieces): one document, cut after a line break near 90% of its tokens.
    lone = tmp_path / "lone.txt"
    lone.write_text("".join(f"line {i:05d} " + "x" * (i % 13) + "\n" for i in range(3000)))
    data = P.prepare([lone], tok, tmp_path / "out-lone", progress=False)
    [head], [tail] = decoded(data, "train", tok), decoded(data, "heldout", tok)
    assert head + tail == lone.read_text() and head.endswith("\n") and tail.startswith("line ")
    n = len(data.tokens("train")) + len(data.tokens("heldout"))
    assert len(data.tokens("heldout")) == pytest.approx(0.1 * n, abs=40)


def test_the_bundled_corpus_through_the_cache_gives_the_tokens_it_always_had(tok):
    """Each bundled domain, prepared into the cache: each document's tokens followed by EOS, in
    file order (what bam tokenized in memory before prepared data)."""
    eos = D.eos_token_id(tok)
    for name in D.DOMAINS:
        for split in D.SPLITS:
            want = [i for enc in tok.encode_batch(D.Source(name).documents(split), add_special_tokens=False)
                    for i in (*enc.ids, eos)]
            got = D.tokens(D.Source(name), split, tok)
            assert isinstance(got, np.memmap) and got.tolist() == want
            assert str(P.cache_root()) in str(got.filename)
    assert D.tokens(D.Source("code"), "train", tok) is D.tokens(D.Source("code"), "train", tok)


def test_raw_paths_are_prepared_once_into_the_cache_keyed_by_the_files(tmp_path, tok, docs, capsys):
    src = tmp_path / "c.jsonl"
    src.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    first = D.Source("c", src).prepared(tok)
    assert "data: preparing 'c' once, into the cache" in capsys.readouterr().err
    P._OPEN.clear()
    D._RESOLVED.clear()                                 # as a new process
    again = D.Source("c", src).prepared(tok)
    assert again.path == first.path and capsys.readouterr().err == ""         # opened, not prepared
    src.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs[1:]))
    assert D.Source("c", src).prepared(tok) is again    # a run goes on with the data it began with
    D._RESOLVED.clear()
    changed = D.Source("c", src).prepared(tok)
    assert changed.path != first.path and changed.digest != first.digest
    assert not first.path.exists()                 # the entry of the file as it was: removed
    other = read_tokenizer(BUNDLED_TOKENIZER)
    other.add_tokens(["<|mine|>"])
    D.Source("c", src).prepared(other)
    assert changed.path.exists()                   # another tokenizer's entry is another entry


def test_a_prepared_folder_trains_evaluates_and_mixes_with_the_bundled_domains(tmp_path, tok, docs, capsys):
    src = tmp_path / "corpus.jsonl"
    src.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    model = tmp_path / "model"
    cfg = DenseConfig(vocab_size=8192, dim=16, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=24,
                      max_seq_len=64, tie_embeddings=True, eos_token_id=0)
    DenseLM(cfg).save_pretrained(str(model))
    assert main(["prepare", str(src), "--tokenizer", str(model), "--out", str(tmp_path / "mine"),
                 "--no-progress"]) == 0
    said = capsys.readouterr().out
    assert said.startswith(f"prepared {tmp_path / 'mine'}: 80 documents") and " KiB in " in said
    mine = str(tmp_path / "mine")
    assert main(["prepare", mine, "--tokenizer", str(model), "--out", str(tmp_path / "again")]) == 2
    assert "is prepared data (bam prepare wrote it), not a source to read" in capsys.readouterr().err
    run = ["--steps", "2", "--batch-size", "2", "--seq-len", "16", "--eval-windows", "1", "--no-progress"]
    out = str(tmp_path / "run")
    assert main(["train", str(model), "--data", f"{mine}:0.7,code:0.3", "--out", out, *run]) == 0
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert {mine, "code"} <= set(records[-1]["eval"])
    capsys.readouterr()
    assert main(["eval", str(model), "--data", mine, "--max-windows", "2", "--no-progress"]) == 0
    assert mine in capsys.readouterr().out
    # The stream reads the prepared tokens: the same windows as its arrays say.
    stream = D.BatchStream(mine, seq_len=16, batch_size=4, seed=3, tokenizer=tok)
    arr = P.open_prepared(mine).tokens("train")
    batch = next(stream)
    for row in batch.input_ids:
        starts = [s for s in range(len(arr) - 15) if np.array_equal(arr[s:s + 16], row.numpy())]
        assert starts


def test_prepared_data_of_another_tokenizer_is_refused_naming_both(tmp_path, tok, docs):
    from tokenizers import AddedToken

    src = tmp_path / "c.jsonl"
    src.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    P.prepare([src], tok, tmp_path / "out", progress=False, tokenizer_from="the seed")
    other = read_tokenizer(BUNDLED_TOKENIZER)
    other.add_tokens([AddedToken("<|new|>", special=True)])
    with pytest.raises(ValueError, match=r"prepared with the tokenizer of the seed \(8,192 tokens, SHA-256 "
                                         r"[0-9a-f]{12}\), not this model's \(8,193 tokens"):
        D.tokens(D.Source("out", tmp_path / "out"), "train", other)


def test_a_truncated_or_edited_token_file_is_refused(tmp_path, tok, docs):
    src = tmp_path / "c.jsonl"
    src.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    out = tmp_path / "out"
    P.prepare([src], tok, out, progress=False)
    P.PreparedData(out)
    tokens = out / "train.tokens"
    raw = bytearray(tokens.read_bytes())
    raw[100] ^= 1
    tokens.write_bytes(raw)                           # same size, new time: hashed
    with pytest.raises(ValueError, match="train.tokens' was changed after preparing"):
        P.PreparedData(out)
    tokens.write_bytes(raw[:-2])
    with pytest.raises(ValueError, match="cut short or changed after preparing"):
        P.PreparedData(out)
    tokens.write_bytes(bytes(raw[:100]) + bytes([raw[100] ^ 1]) + bytes(raw[101:]))    # as it was
    P.PreparedData(out)
    (out / "heldout.docs").unlink()
    with pytest.raises(ValueError, match="heldout.docs' is missing"):
        P.PreparedData(out)


@pytest.mark.parametrize("case", ["not-json", "no-field", "no-column", "empty", "not-utf8", "gzip-cut",
                                  "not-ours", "one-token"])
def test_bad_input_is_one_line_and_nothing_is_written(tmp_path, tok, capsys, case):
    import pyarrow as pa
    import pyarrow.parquet as pq

    src = tmp_path / "in"
    src.mkdir()
    model = tmp_path / "tokenizer.json"
    model.write_bytes((D.CORPUS_DIR / "tokenizer.json").read_bytes())
    out = tmp_path / "out"
    expect = {
        "not-json": (lambda: (src / "a.jsonl").write_text('{"text": "fine"}\n{"text": oops}\n'),
                     r"'.*a\.jsonl' line 2 is not JSON"),
        "no-field": (lambda: (src / "a.jsonl").write_text('{"text": "fine"}\n{"body": "x"}\n'),
                     r"line 2 has no 'text' field \(its keys: 'body'\)"),
        "no-column": (lambda: pq.write_table(pa.table({"body": ["x"]}), src / "a.parquet"),
                      r"has no column 'text' \(its columns: 'body'\)"),
        "empty": (lambda: ((src / "a.jsonl").write_text('{"text": ""}\n'), (src / "b.txt").write_text("")),
                  "the corpus holds no document"),
        "not-utf8": (lambda: (src / "a.txt").write_bytes(b"fine text\n" * 50_000 + b"\xff bad"),
                     r"'.*a\.txt' is not UTF-8 text \(byte 500000: invalid start byte\)"),
        "gzip-cut": (lambda: (src / "a.jsonl.gz").write_bytes(gzip.compress("".join(
                         json.dumps({"text": str(i * i)}) + "\n" for i in range(5000)).encode())[:2000]),
                     "is not a complete gzip file"),
        "not-ours": (lambda: (out.mkdir(), (out / "notes.txt").write_text("mine"),
                              (src / "a.txt").write_text("text")),
                     "is not empty and was not written by bam"),
        "one-token": (lambda: (src / "a.txt").write_text("a"), "too few to split"),
    }
    make, message = expect[case]
    make()
    before = sorted(p.name for p in out.iterdir()) if out.exists() else None
    assert main(["prepare", str(src), "--tokenizer", str(model), "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    import re
    assert re.search(message, err), err
    assert (sorted(p.name for p in out.iterdir()) if out.exists() else None) == before


def test_a_killed_prepare_leaves_nothing_that_loads_and_the_next_one_finishes(tmp_path, tok, docs):
    src = tmp_path / "big.jsonl"
    with open(src, "w") as f:
        for i in range(16):          # 12.6 MB: two batches of bam prepare, killed after the first
            for d in docs:
                f.write(json.dumps({"text": f"{i} {d}"}) + "\n")
    out = tmp_path / "out"
    argv = [sys.executable, "-m", "bam_model.cli", "prepare", str(src), "--tokenizer",
            str(D.CORPUS_DIR / "tokenizer.json"), "--out", str(out), "--no-progress", "--workers", "1"]
    proc = subprocess.Popen(argv, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline:      # killed once tokens are being written
        staged = list(out.glob(".bam-staging-*/train.tokens")) if out.exists() else []
        if staged and staged[0].stat().st_size > 0:
            break
        time.sleep(0.05)
    assert proc.poll() is None, proc.communicate()
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / P.INDEX).exists()
    with pytest.raises(ValueError, match="holds no prepared data"):
        D.tokens(D.Source("out", out), "train", tok)
    assert files.check_output(out, "data") == "new"           # what it left counts as nothing
    r = subprocess.run(argv, env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    names = [P.INDEX, "bam-manifest.json", *(f"{s}.{k}" for s in P.SPLITS for k in ("tokens", "docs"))]
    assert sorted(p.name for p in out.iterdir()) == sorted(names)
    assert len(P.PreparedData(out).tokens("train")) > 2_000_000


@needs_namespaces
def test_a_full_disk_while_preparing_is_one_line_and_leaves_nothing(tmp_path, docs):
    src = tmp_path / "c.jsonl"
    src.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs * 3))
    disk = tmp_path / "disk"
    r, left = _on_full_disk(disk, 200, "prepare", src, "--tokenizer", D.CORPUS_DIR / "tokenizer.json",
                            "--out", disk / "out", "--no-progress")
    assert r.returncode == 2 and "No space left on device" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
    assert r.stderr.count("\n") == 1 and left == []


def test_resume_on_prepared_data_repeats_the_uninterrupted_run(tmp_path, tok, docs):
    """Batches of a stream over a prepared folder and a mixture with a bundled domain: a stream
    restored from any state goes on exactly as the one that was not stopped; two ranks' rows
    together are the one process's batch."""
    src = tmp_path / "c.jsonl"
    src.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    P.prepare([src], tok, tmp_path / "p", progress=False)
    spec = f"{tmp_path / 'p'}:0.6,drama:0.4"
    kw = dict(seq_len=24, batch_size=6, seed=5, tokenizer=tok)
    whole = D.BatchStream(spec, **kw)
    batches = [next(whole) for _ in range(40)]
    stopped = D.BatchStream(spec, **kw)
    for _ in range(17):
        next(stopped)
    resumed = D.BatchStream(spec, **kw)
    resumed.load_state_dict(json.loads(json.dumps(stopped.state_dict())))
    for b in batches[17:]:
        assert torch.equal(next(resumed).input_ids, b.input_ids)
    ranks = [D.BatchStream(spec, **kw, rank=r, world_size=2) for r in range(2)]
    for b in batches[:10]:
        rows = [next(s).input_ids for s in ranks]
        assert torch.equal(torch.stack([rows[0], rows[1]], 1).flatten(0, 1), b.input_ids)


CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def _chat_model(folder: Path, template: str = CHATML) -> Path:
    cfg = DenseConfig(vocab_size=8192, dim=16, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=24,
                      max_seq_len=64, tie_embeddings=True, eos_token_id=0)
    DenseLM(cfg).save_pretrained(str(folder))
    (folder / "chat_template.jinja").write_text(template)
    return folder


def test_conversations_are_rendered_and_trained_on_the_assistant_turns_only(tmp_path, tok, capsys):
    talks = [[{"role": "system", "content": "Be brief."}, {"role": "user", "content": f"Count to {i}."},
              {"role": "assistant", "content": " ".join(map(str, range(1, i + 1)))},
              {"role": "user", "content": "Thanks."}, {"role": "assistant", "content": f"Welcome, {i}."}]
             for i in range(2, 30)]
    src = tmp_path / "chat.jsonl"
    src.write_text("".join(json.dumps({"messages": t}) + "\n" for t in talks)
                   + "".join(json.dumps({"text": f"A plain note, number {i}."}) + "\n" for i in range(5)))
    model = _chat_model(tmp_path / "model")
    out = tmp_path / "out"
    assert main(["prepare", str(src), "--tokenizer", str(model), "--out", str(out), "--no-progress"]) == 0
    assert "of the training tokens are in the loss" in capsys.readouterr().out
    data = P.PreparedData(out)
    assert data.index["chat"]["masked"] is True
    eos = D.eos_token_id(tok)
    said = set()
    for split in P.SPLITS:
        toks, mask, ends = data.tokens(split), data.mask(split), data.doc_ends(split).astype(np.int64)
        assert len(mask) == len(toks)
        for a, b in zip(np.concatenate([[0], ends[:-1]]), ends):
            ids, keep = toks[a:b].tolist(), mask[a:b].tolist()
            if tok.decode(ids[:-1]).startswith("<|im_start|>"):
                assert keep[-1] == 0 and ids[-1] == eos          # the joining EOS is no target
                said.add(tok.decode([t for t, k in zip(ids, keep) if k]))
            else:
                assert all(keep)                                 # a plain document: every token
    want = {"".join(f"{m['content']}<|im_end|>\n" for m in t if m["role"] == "assistant") for t in talks}
    assert said == want
    # The stream's labels leave out exactly the tokens outside the loss; a step trains on them.
    stream = D.BatchStream(str(out), seq_len=32, batch_size=8, seed=0, tokenizer=tok)
    batch = next(stream)
    masked = batch.labels == -100
    assert masked.any() and (~masked).any()
    assert torch.equal(batch.labels[~masked], batch.input_ids[~masked])
    run = ["--steps", "1", "--batch-size", "2", "--seq-len", "32", "--eval-windows", "2", "--no-progress"]
    assert main(["train", str(model), "--data", str(out), "--out", str(tmp_path / "run"), *run]) == 0
    # A raw file of conversations needs the model's template: bam prepare.
    with pytest.raises(ValueError, match="is a conversation .* prepare the data with bam prepare"):
        D.tokens(D.Source("chat", src), "train", tok)


def test_conversations_a_template_cannot_cut_and_chat_without_a_template_are_refused(tmp_path, capsys):
    src = tmp_path / "chat.jsonl"
    talk = [{"role": "user", "content": "Hi."}, {"role": "assistant", "content": "Hello."}]
    src.write_text(json.dumps({"messages": talk}) + "\n" + json.dumps({"messages": "not a list"}) + "\n")
    # A template that writes the last turn differently: the assistant's tokens cannot be found.
    odd = _chat_model(tmp_path / "odd", "{% for m in messages %}{% if loop.last %}LAST {% endif %}"
                                        "{{ m['content'] }}\n{% endfor %}")
    argv = ["prepare", str(src), "--no-progress", "--out"]
    assert main([*argv, str(tmp_path / "o1"), "--tokenizer", str(odd)]) == 2
    assert "line 1: the chat template renders turn 1 differently" in capsys.readouterr().err
    model = _chat_model(tmp_path / "model")
    assert main([*argv, str(tmp_path / "o2"), "--tokenizer", str(model)]) == 2
    err = capsys.readouterr().err
    assert "line 2: 'messages' must be a non-empty list of messages, got 'not a list'" in err
    (model / "chat_template.jinja").unlink()
    assert main(["generate", str(model), "--chat", "--prompt", "Hi"]) == 2
    assert "the model has no chat template" in capsys.readouterr().err


def test_review_cases_of_the_sources(tmp_path, tok, docs, monkeypatch, capsys):
    """A long text file in pieces gives the whole document's tokens (cut where the pre-tokenizer
    splits anyway); a large text file is not held out whole; a cut Arrow file, a listed data file
    that is missing, a DatasetDict split of an unknown name and a chat template that raises are one
    line each; train_sft / test_sft splits are kept."""
    import datasets

    from bam_model import readers

    monkeypatch.setattr(readers, "TEXT_PIECE", 4096)
    text = "".join(f"line {i:05d}:" + " word" * (i % 7) + ("  \n" if i % 5 == 0 else "\n")
                   for i in range(3000))
    (tmp_path / "long.txt").write_text(text)
    data = P.prepare([tmp_path / "long.txt"], tok, tmp_path / "o-long", progress=False)
    both = np.concatenate([data.tokens("train"), data.tokens("heldout")]).tolist()
    assert both[:-1] == tok.encode(text, add_special_tokens=False).ids
    folder = tmp_path / "texts"
    folder.mkdir()
    (folder / "data.txt").write_text(text)
    (folder / "README.md").write_text("What this folder holds.\n")
    data = P.prepare([folder], tok, tmp_path / "o-texts", progress=False)
    n = len(data.tokens("train")) + len(data.tokens("heldout"))
    assert 0.05 < len(data.tokens("heldout")) / n < 0.2            # never the large file whole

    ds = datasets.Dataset.from_dict({"text": docs[:20]})
    ds.save_to_disk(tmp_path / "ds")
    arrow = next((tmp_path / "ds").glob("*.arrow"))
    arrow.write_bytes(arrow.read_bytes()[:len(arrow.read_bytes()) // 2])
    argv = ["prepare", "--tokenizer", str(D.CORPUS_DIR / "tokenizer.json"), "--no-progress", "--out"]
    assert main([*argv, str(tmp_path / "o1"), str(tmp_path / "ds")]) == 2
    assert "is not a complete Arrow file" in capsys.readouterr().err
    arrow.unlink()
    assert main([*argv, str(tmp_path / "o2"), str(tmp_path / "ds")]) == 2
    assert "state.json', is missing" in capsys.readouterr().err
    splits = {"train_sft": docs[:30], "test_sft": docs[30:40]}
    dd = datasets.DatasetDict({k: datasets.Dataset.from_dict({"text": v}) for k, v in splits.items()})
    dd.save_to_disk(tmp_path / "dd")
    counts = P.prepare([tmp_path / "dd"], tok, tmp_path / "o3", progress=False).index["splits"]
    assert counts["heldout"]["documents"] == 10 and counts["train"]["documents"] == 30
    datasets.DatasetDict({"train": ds, "unsupervised": ds}).save_to_disk(tmp_path / "dd2")
    assert main([*argv, str(tmp_path / "o4"), str(tmp_path / "dd2")]) == 2
    assert "has the split(s) 'unsupervised'" in capsys.readouterr().err
    model = _chat_model(tmp_path / "strict", "{% for m in messages %}{% if m['role'] == 'system' %}"
                        "{{ raise_exception('no system turns') }}{% endif %}{{ m['content'] }}{% endfor %}")
    (tmp_path / "c.jsonl").write_text(json.dumps({"messages": [{"role": "system", "content": "x"}]}) + "\n")
    assert main(["prepare", str(tmp_path / "c.jsonl"), "--tokenizer", str(model), "--out",
                 str(tmp_path / "o5"), "--no-progress"]) == 2
    assert "c.jsonl' line 1: the chat template failed on this conversation: no system turns" in \
        capsys.readouterr().err


def test_review_cases_of_reading(tmp_path, tok, docs):
    """A folder prepared again while open does not change what the open one reads; an index whose
    dtype does not fit its vocabulary is refused; a cache entry of another layout does not stop the
    clean-up of stale entries."""
    src = tmp_path / "c.jsonl"
    src.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    data = P.prepare([src], tok, tmp_path / "out", progress=False)
    before = np.array(data.tokens("heldout"))
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in ("something else entirely", "and more")))
    P.prepare([src], tok, tmp_path / "out", progress=False)
    assert np.array_equal(data.tokens("heldout"), before)
    index = json.loads((tmp_path / "out" / P.INDEX).read_text())
    index["dtype"] = "uint32"
    (tmp_path / "out" / P.INDEX).write_text(json.dumps(index))
    with pytest.raises(ValueError, match="dtype 'uint32' for a vocabulary of 8192 tokens"):
        P.PreparedData(tmp_path / "out")
    root = P.cache_root()
    odd = root / ("0" * 32)
    odd.mkdir(parents=True, exist_ok=True)
    files.claim_folder(odd, "data", [P.INDEX])
    (odd / P.INDEX).write_text(json.dumps({"format": "bam-data", "tokenizer": "not a record", "sources": 3}))
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs[:20]))
    D.Source("d", tmp_path / "d.jsonl").prepared(tok)        # its stale-entry clean-up passes the odd one
    assert odd.exists()


def test_a_masked_batch_trains_the_same_with_any_grad_accum(tmp_path, tok, capsys):
    """With conversations' masked labels, one step over a batch gives the same weights whether it
    runs as one micro-batch or four: every target token counts once, whatever micro-batch it is in."""
    talks = [[{"role": "user", "content": f"Say {i} " + "please " * (i % 9)},
              {"role": "assistant", "content": "ok " * (1 + i % 5)}] for i in range(60)]
    src = tmp_path / "chat.jsonl"
    src.write_text("".join(json.dumps({"messages": t}) + "\n" for t in talks))
    model = _chat_model(tmp_path / "model")
    out = tmp_path / "data"
    assert main(["prepare", str(src), "--tokenizer", str(model), "--out", str(out), "--no-progress"]) == 0
    weights = []
    for accum in (1, 4):
        run = tmp_path / f"run{accum}"
        argv = ["train", str(model), "--data", str(out), "--out", str(run), "--steps", "1", "--batch-size",
                "8", "--grad-accum", str(accum), "--seq-len", "24", "--eval-windows", "1", "--no-progress",
                "--lr", "1e-2", "--warmup", "1"]
        assert main(argv) == 0, capsys.readouterr().err
        from safetensors.torch import load_file
        weights.append(load_file(str(run / "model" / "model.safetensors")))
    for name in weights[0]:
        torch.testing.assert_close(weights[0][name], weights[1][name], rtol=1e-3, atol=1e-5)
