"""A seeded fuzz of the data pipeline: valid records of every format mutated the ways real files
go wrong, written as .jsonl, .jsonl.gz, .json, Parquet and CSV, read by the real Ray Data pipeline in
one run. The run finishes, and every record written is either a training/eval example or in
rejected/ with a reason: the counts add up exactly. tests/RELIABILITY.md keeps the figures."""

from __future__ import annotations

import csv
import gzip
import io
import json
import random
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ft_ray.config import config_from_dict, resolve_paths
from ft_ray.data.pipeline import build_datasets
from ft_ray.models import load_tokenizer
from tests.conftest import DEMO, tiny_job

pytestmark = pytest.mark.integration

SEED, PER_FILE = 20261130, 550  # 5 files: 2,750 records
MAX_RECORD_BYTES = 64 << 10
DEMO_RECORDS = [json.loads(line) for line in (DEMO / "train.jsonl").read_text().splitlines()]


SHAPES = {  # each file holds one format, as a user's files do
    "instruction": lambda r: r,
    "chat": lambda r: {"messages": [{"role": "user", "content": r["instruction"]},
                                    {"role": "assistant", "content": r["output"]}]},
    "sharegpt": lambda r: {"conversations": [{"from": "human", "value": r["instruction"]},
                                             {"from": "gpt", "value": r["output"]}]},
    "completion": lambda r: {"prompt": r["instruction"], "completion": r["output"]},
    "text": lambda r: {"text": r["instruction"] + " " + r["output"]},
}


def valid(rng: random.Random, shape: str) -> dict:
    """A valid record of the shape, from the demo corpus."""
    return SHAPES[shape](rng.choice(DEMO_RECORDS))


def value_mutation(rng: random.Random, record: dict) -> tuple[str, dict]:
    """(kind, record) with its values broken but still JSON: what survives a JSON array or Parquet."""
    key = rng.choice(sorted(record))
    kind = rng.choice(["deep", "huge", "wrong_type", "unknown_role", "surrogate", "nul", "empty", "missing", "none"])
    record = json.loads(json.dumps(record))
    if kind == "deep":
        nested: object = "x"
        for _ in range(rng.choice([50, 400])):
            nested = [nested]
        record[key] = nested
    elif kind == "huge":  # random text: a run of one letter would trip the gzip-bomb guard instead
        record[key] = rng.randbytes(rng.choice([MAX_RECORD_BYTES // 4, MAX_RECORD_BYTES])).hex()
    elif kind == "wrong_type":
        record[key] = rng.choice([5, 1.5, True, {"a": 1}, ["a"]])
    elif kind == "unknown_role":
        record = {"messages": [{"role": "robot", "content": "beep"}, {"role": "assistant", "content": "ok"}]}
    elif kind == "surrogate":
        record[key] = "bad \ud800 text" if isinstance(record[key], str) else "\udfff"
    elif kind == "nul":
        record[key] = json.dumps(record[key]) + "\x00\x00"
    elif kind == "empty":
        record[key] = ""
    elif kind == "missing":
        record.pop(key)
    else:
        record[key] = None
    return kind, record


def line_of(rng: random.Random, shape: str) -> tuple[str, bytes]:
    """(kind, one JSONL line without its newline): valid, value-mutated or byte-mutated."""
    record = valid(rng, shape)
    roll = rng.random()
    if roll < 0.25:
        return "valid", json.dumps(record).encode()
    if roll < 0.6:
        kind, record = value_mutation(rng, record)
        return kind, json.dumps(record).encode()
    raw = bytearray(json.dumps(record, ensure_ascii=rng.random() < 0.5).encode())
    kind = rng.choice(["truncate", "flip", "nul_bytes", "bom", "crlf", "invalid_utf8", "deep_raw"])
    if kind == "truncate":
        raw = raw[:rng.randrange(1, len(raw))]
    elif kind == "flip":
        for _ in range(rng.randint(1, 4)):
            raw[rng.randrange(len(raw))] ^= 1 << rng.randrange(8)
    elif kind == "nul_bytes":
        raw[rng.randrange(len(raw)):0] = b"\x00" * rng.randint(1, 3)
    elif kind == "bom":
        raw[0:0] = b"\xef\xbb\xbf"
    elif kind == "crlf":
        raw += b"\r"
    elif kind == "invalid_utf8":
        raw[rng.randrange(len(raw)):0] = rng.choice([b"\xff", b"\xc3", b"\xed\xa0\x80", b"\xe9"])
    else:
        raw = bytearray(b"[" * 20_000 + b"]" * 20_000)  # under max_record_bytes, too deep for any parser
    raw = raw.replace(b"\n", b" ")  # one record per line: a flipped byte must not split it
    return kind, bytes(raw) if raw.strip() else b"x"


def csv_row(rng: random.Random) -> tuple[str, bytes]:
    """(kind, one CSV row as written, without its last newline): valid (values over lines
    too) or broken in ways that keep the rows apart (no stray quote opening a value)."""
    r = rng.choice(DEMO_RECORDS)
    kind = rng.choice(["valid", "multiline", "extra_value", "missing_value", "empty", "huge", "invalid_utf8", "nul"])
    values = [r["instruction"], r["output"]]
    if kind == "multiline":
        values[1] = values[1].replace(" ", "\n", 2)
    elif kind == "extra_value":
        values.append("extra")
    elif kind == "missing_value":
        values = values[:1]
    elif kind == "empty":
        values[1] = "  "
    elif kind == "huge":
        values[1] = rng.randbytes(MAX_RECORD_BYTES).hex()
    out = io.StringIO()
    csv.writer(out, lineterminator="\n").writerow(values)
    raw = bytearray(out.getvalue().removesuffix("\n").encode())
    if kind in ("invalid_utf8", "nul"):  # inside the first value, if unquoted (before a quote it would unquote it)
        at = len(raw) if raw.startswith(b'"') else rng.randrange(len(values[0].encode()) + 1)
        raw[at:at] = b"\xff" if kind == "invalid_utf8" else b"\x00"
    return kind, bytes(raw)


def write_corpus(folder: Path, rng: random.Random) -> Counter:
    """The five files; returns the count of each mutation kind written."""
    kinds: Counter = Counter()
    lines = [line_of(rng, "instruction") for _ in range(PER_FILE)] + [line_of(rng, "chat") for _ in range(PER_FILE)]
    kinds.update(kind for kind, _ in lines)
    (folder / "a.jsonl").write_bytes(b"\n".join(raw for _, raw in lines[:PER_FILE]) + b"\n")
    with gzip.open(folder / "b.jsonl.gz", "wb") as f:
        f.write(b"\n".join(raw for _, raw in lines[PER_FILE:]) + b"\n")
    items = []
    for _ in range(PER_FILE):
        shape = rng.choice(["sharegpt", "completion", "text"])  # auto takes the commonest: the rest are unknown_format
        kind, record = value_mutation(rng, valid(rng, shape)) if rng.random() < 0.7 else ("valid", valid(rng, shape))
        if rng.random() < 0.05:
            kind, text = "deep_raw", "[" * 5000 + "]" * 5000  # too deep to parse, short enough to read
        else:
            text = json.dumps(record, indent=rng.choice([None, 2]))
        kinds[kind] += 1
        items.append(text)
    (folder / "c.json").write_text("[" + ",\n".join(items) + "]")
    rows = []
    for _ in range(PER_FILE):  # Parquet: one typed column each; broken values are empty, null or huge
        r = rng.choice(DEMO_RECORDS)
        kind = rng.choice(["valid", "empty", "none", "huge"])
        kinds[kind] += 1
        value = {"valid": r["output"], "empty": "  ", "none": None, "huge": rng.randbytes(MAX_RECORD_BYTES).hex()}[kind]
        rows.append({"instruction": r["instruction"], "output": value})
    pq.write_table(pa.Table.from_pylist(rows), folder / "d.parquet")
    csv_rows = [csv_row(rng) for _ in range(PER_FILE)]
    kinds.update(f"csv_{kind}" for kind, _ in csv_rows)
    (folder / "e.csv").write_bytes(b"instruction,output\r\n" + b"\r\n".join(raw for _, raw in csv_rows) + b"\r\n")
    return kinds


def test_fuzzed_records_of_every_file_kind_are_trained_or_rejected_never_a_crash(ray_local, tmp_path):
    rng = random.Random(SEED)
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    kinds = write_corpus(corpus, rng)
    written = 5 * PER_FILE
    job = tiny_job(tmp_path)
    job["data"] = {"sources": [{"path": str(f)} for f in sorted(corpus.iterdir())], "eval_fraction": 0.1,
                   "max_rejected_fraction": 1.0, "max_record_bytes": MAX_RECORD_BYTES}
    config = resolve_paths(config_from_dict(job))
    _, stats = build_datasets(config, load_tokenizer(config.model), str(tmp_path / "rejected"))

    rejected = [json.loads(line) for f in (tmp_path / "rejected").glob("*.json") for line in f.read_text().splitlines()]
    assert stats.records_read == written
    assert stats.train_examples + stats.eval_examples + stats.records_rejected == written
    assert len(rejected) == stats.records_rejected > written // 3
    assert all(r["reason"] and r["detail"] for r in rejected)
    assert Counter(r["reason"] for r in rejected) == Counter(stats.rejected_by_reason)
    by_file = Counter(Path(r["path"]).name for r in rejected)
    assert set(by_file) == {"a.jsonl", "b.jsonl.gz", "c.json", "d.parquet", "e.csv"}  # every kind had its rejects
    assert stats.train_examples > written // 4  # the valid records trained
    assert {"too_deep", "too_large", "bad_unicode", "not_json", "not_utf8", "not_csv"} <= set(stats.rejected_by_reason)
    assert sum(kinds.values()) == written and len(kinds) >= 15
    print(f"fuzz: {written} records, {len(kinds)} kinds, rejected {stats.records_rejected} "
          f"{dict(sorted(stats.rejected_by_reason.items()))}")
