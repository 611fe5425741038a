"""Documents from text, JSON Lines, JSON (plain and gzip) and Parquet files, and every bad input
named by its file and line or row."""
import gzip
import json

import pytest

from bam_model.readers import file_format, read_documents

RECORDS = [{"text": "def f(x):\n    return x\n", "id": 1}, {"text": "", "id": 2},
           {"text": "Ünïcode — text", "id": 3}]
DOCS = [r["text"] for r in RECORDS if r["text"]]


def write_jsonl(path, records, gz=False):
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records) + "\n"
    (gzip.open(path, "wt", encoding="utf-8") if gz else open(path, "w", encoding="utf-8")).write(text)


@pytest.mark.parametrize("name", ["a.jsonl", "a.jsonl.gz", "a.json", "a.json.gz", "a.parquet", "a.md"])
def test_each_format_gives_its_documents_in_order(tmp_path, name):
    path = tmp_path / name
    if name.startswith("a.jsonl"):
        write_jsonl(path, RECORDS, gz=name.endswith(".gz"))
    elif name.startswith("a.json"):
        data = json.dumps(RECORDS).encode()
        path.write_bytes(gzip.compress(data) if name.endswith(".gz") else data)
    elif name == "a.parquet":
        pa, pq = pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")
        pq.write_table(pa.table({"id": [r["id"] for r in RECORDS], "text": [r["text"] for r in RECORDS]}),
                       path, row_group_size=2)            # two row groups: read one at a time
    else:
        path.write_text("# notes\n\nplain text, one document\n", encoding="utf-8")
    expected = ["# notes\n\nplain text, one document\n"] if name == "a.md" else DOCS
    assert list(read_documents(path)) == expected
    assert file_format(path) == {"a.jsonl": "jsonl", "a.jsonl.gz": "jsonl", "a.json": "json",
                                 "a.json.gz": "json", "a.parquet": "parquet", "a.md": "text"}[name]


def test_another_text_field(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", [{"content": "x y"}, {"content": "z"}])
    assert list(read_documents(tmp_path / "a.jsonl", text_field="content")) == ["x y", "z"]


@pytest.mark.parametrize("lines, message", [
    (['{"text": "ok"}', '{"text": "broken'], "line 2 is not JSON"),
    (['{"text": "ok"}', '[1, 2]'], "line 2 is not a JSON object, got [1, 2]"),
    (['{"body": "no text here", "id": 7}'], "line 1 has no 'text' field (its keys: 'body', 'id')"),
    (['{"text": 5}'], "line 1: 'text' must be a string, got 5"),
])
def test_bad_jsonl_is_named_by_file_and_line(tmp_path, lines, message):
    (tmp_path / "a.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=f"a.jsonl' {message}".replace("[", r"\[").replace("]", r"\]")
                       .replace("(", r"\(").replace(")", r"\)")):
        list(read_documents(tmp_path / "a.jsonl"))


def test_bad_bytes_json_gzip_and_parquet_are_named(tmp_path):
    (tmp_path / "a.jsonl").write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(ValueError, match=r"a.jsonl' line 2 is not UTF-8 \(byte 13 of the line"):
        list(read_documents(tmp_path / "a.jsonl"))
    (tmp_path / "b.txt").write_bytes(b"abc\xffdef")
    with pytest.raises(ValueError, match=r"b.txt' is not UTF-8 text \(byte 3"):
        list(read_documents(tmp_path / "b.txt"))
    (tmp_path / "c.json").write_text('{"text": "one object, not a list"}')
    with pytest.raises(ValueError, match="must hold a JSON array of objects"):
        list(read_documents(tmp_path / "c.json"))
    (tmp_path / "d.jsonl.gz").write_bytes(gzip.compress(b'{"text": "x"}\n' * 100)[:40])
    with pytest.raises(ValueError, match="is not a complete gzip file"):
        list(read_documents(tmp_path / "d.jsonl.gz"))
    pa, pq = pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "e.parquet")
    with pytest.raises(ValueError, match=r"e.parquet' has no column 'text' \(its columns: 'body'\)"):
        list(read_documents(tmp_path / "e.parquet"))
    (tmp_path / "f.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(ValueError, match="is not a readable Parquet file"):
        list(read_documents(tmp_path / "f.parquet"))
