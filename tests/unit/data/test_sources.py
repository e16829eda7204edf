"""Reading sources without Ray: every file kind, line/row numbers, bad bytes, listing, format choice."""

import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ft_ray.config import SourceConfig, StorageConfig
from ft_ray.data.sources import DataError, choose_format, file_kind, list_files, read_records

STORAGE = StorageConfig()
GOOD = {"instruction": "Name a colour.", "output": "Red."}


def records(path):
    return [(line, text, error) for _, line, text, error in read_records(str(path), STORAGE, "data.train")]


def test_jsonl_keeps_line_numbers_and_sets_bad_bytes_aside(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_bytes(json.dumps(GOOD).encode() + b"\r\n\n" + b'{"text": "caf\xe9"}\n' + json.dumps(GOOD).encode())
    got = records(path)
    assert [line for line, _, _ in got] == [1, 3, 4]  # the blank line 2 is no record
    assert got[0] == (1, json.dumps(GOOD), "")
    assert got[1][2].startswith("not_utf8: invalid byte at offset 13") and "\\xe9" in got[1][1]


def test_gzip_json_array_parquet_and_text(tmp_path):
    with gzip.open(tmp_path / "a.jsonl.gz", "wt") as f:
        f.write(json.dumps(GOOD) + "\n" + json.dumps(GOOD) + "\n")
    (tmp_path / "b.json").write_text(json.dumps([GOOD, {"text": "x"}]))
    pq.write_table(pa.Table.from_pylist([{"question": "q", "answer": "a"}] * 3), tmp_path / "c.parquet")
    (tmp_path / "d.txt").write_text("first paragraph\nstill first\n\n\nsecond\n")
    assert [line for line, _, _ in records(tmp_path / "a.jsonl.gz")] == [1, 2]
    assert [(line, json.loads(text)) for line, text, _ in records(tmp_path / "b.json")] == [(1, GOOD), (2, {"text": "x"})]
    assert [(line, json.loads(text)) for line, text, _ in records(tmp_path / "c.parquet")] == [
        (row, {"question": "q", "answer": "a"}) for row in (1, 2, 3)]
    assert [(line, json.loads(text)) for line, text, _ in records(tmp_path / "d.txt")] == [
        (1, {"text": "first paragraph\nstill first"}), (5, {"text": "second"})]
    # A folder lists every known kind, sorted; a glob only what it matches.
    assert [p.rsplit("/", 1)[1] for p in list_files(str(tmp_path), STORAGE)[1]] == [
        "a.jsonl.gz", "b.json", "c.parquet", "d.txt"]
    assert list_files(str(tmp_path / "*.json*"), STORAGE)[1] == [str(tmp_path / "a.jsonl.gz"), str(tmp_path / "b.json")]


def test_a_broken_json_file_is_one_rejected_record_with_its_line(tmp_path):
    (tmp_path / "broken.json").write_text('[\n{"text": "a"},\n{"text": \n')
    [(line, _, error)] = records(tmp_path / "broken.json")
    assert line == 4 and error.startswith("not_json: Expecting value (line 4")


def test_nothing_to_read_names_the_key_and_what_was_looked_for(tmp_path):
    (tmp_path / "notes.csv").write_text("a,b\n")
    with pytest.raises(DataError, match=r"data.sources\[1\]: no data files at .* \(looked for .jsonl"):
        list_files(str(tmp_path), STORAGE, "data.sources[1]")
    assert file_kind("x.JSONL.GZ") == "jsonl" and file_kind("x.csv") is None


def test_auto_format_is_chosen_from_the_first_records_and_said(tmp_path):
    path = tmp_path / "share.jsonl"
    chat = {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]}
    path.write_text("\n".join(json.dumps(r) for r in [chat, chat, {"text": "odd one"}, chat]) + "\n")
    fmt, note = choose_format(SourceConfig(path=str(path), format="auto"), STORAGE, "data.train")
    assert fmt == "chat" and note == f"data.train: format auto -> chat (3 of the first 4 records of {path})"
    mapped = SourceConfig(path=str(path), format="auto", fields={"text": "missing"})
    assert choose_format(mapped, STORAGE, "data.train")[0] == "chat"
    assert choose_format(SourceConfig(path=str(path), format="text"), STORAGE, "k") == ("text", "k: format text (from the config)")
