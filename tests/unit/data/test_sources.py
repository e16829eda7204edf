"""Reading sources without Ray: every file kind, line/row numbers, bad bytes, listing, format choice."""

import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ft_ray.config import SourceConfig, StorageConfig
from ft_ray.data.readers import READ_CHUNK, ReadLimits, Unit, file_kind, file_records
from ft_ray.data.sources import DataError, choose_format, list_files, read_records

STORAGE = StorageConfig()
GOOD = {"instruction": "Name a colour.", "output": "Red."}


def records(path):
    return [(line, text, error) for _, line, text, error in read_records(str(path), STORAGE, "data.train")]


def test_jsonl_keeps_line_numbers_and_sets_bad_bytes_aside(tmp_path):
    path = tmp_path / "a.jsonl"  # starting with a byte order mark, as Windows tools write it
    path.write_bytes("\ufeff".encode() + json.dumps(GOOD).encode() + b"\r\n\n" + b'{"text": "caf\xe9"}\n' + json.dumps(GOOD).encode())
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
    assert [(line, json.loads(text)) for line, text, _ in records(tmp_path / "d.txt")] == [  # data.text_unit: line
        (1, {"text": "first paragraph"}), (2, {"text": "still first"}), (5, {"text": "second"})]
    # A folder lists every known kind, sorted; a glob only what it matches.
    assert [p.rsplit("/", 1)[1] for p in list_files(str(tmp_path), STORAGE)[1]] == [
        "a.jsonl.gz", "b.json", "c.parquet", "d.txt"]
    assert list_files(str(tmp_path / "*.json*"), STORAGE)[1] == [str(tmp_path / "a.jsonl.gz"), str(tmp_path / "b.json")]


def test_csv_and_tsv_rows_are_records_keyed_by_the_header(tmp_path):
    lines = ["\ufeffinstruction,output", "Name a colour.,Red.", "", '"Say, twice","Hi.', 'Hi."',
             '"Add ""quotes""",""', "only one value", '"closed"late,x', "Last.,Done."]
    (tmp_path / "a.csv").write_bytes("\r\n".join(lines).encode())
    got = records(tmp_path / "a.csv")
    assert [(line, json.loads(text) if not error else text, error) for line, text, error in got] == [
        (2, GOOD, ""),
        (4, {"instruction": "Say, twice", "output": "Hi.\nHi."}, ""),  # a quoted value over two lines
        (6, {"instruction": 'Add "quotes"', "output": ""}, ""),
        (7, "only one value", "not_csv: 1 values, the header names 2 columns (a delimiter or quote out of place?)"),
        (8, '"closed"late,x', "not_csv: ',' expected after '\"'"),
        (9, {"instruction": "Last.", "output": "Done."}, "")]
    long = "x" * 300_000  # past the csv module's default field limit, within data.max_record_bytes
    with gzip.open(tmp_path / "b.tsv.gz", "wt") as f:
        f.write(f"prompt\tcompletion\tlabel\nQ?\tYes, sure.\tTrue\nQ?\t{long}\tfalse\n")
    assert records(tmp_path / "b.tsv.gz") == [
        (2, json.dumps({"prompt": "Q?", "completion": "Yes, sure.", "label": "True"}), ""),
        (3, json.dumps({"prompt": "Q?", "completion": long, "label": "false"}), "")]
    (tmp_path / "c.csv").write_bytes(b'"never closed,x\n')
    assert records(tmp_path / "c.csv") == [
        (1, "", "not_csv: unexpected end of data; the header line could not be read, the file is skipped")]


def test_a_json_array_broken_mid_way_keeps_the_items_before_and_rejects_the_rest(tmp_path):
    (tmp_path / "broken.json").write_text('[\n{"text": "a"},\n{"text": \n')
    [(first, text, ok), (second, _, error)] = records(tmp_path / "broken.json")
    assert (first, json.loads(text), ok) == (1, {"text": "a"}, "")
    assert second == 2 and error == "not_json: Expecting value (item 2); the rest of the file is skipped"


def test_json_arrays_stream_item_by_item_within_max_record_bytes(tmp_path):

    items = [GOOD, {"text": "é" * (READ_CHUNK // 2 + 7)}, {"text": "z" * 300_000}, GOOD]  # items across chunks
    (tmp_path / "a.json").write_text("\ufeff" + json.dumps(items, ensure_ascii=False))
    got = [(line, text, error) for _, line, text, error in
           read_records(str(tmp_path / "a.json"), STORAGE, "data.train", ReadLimits(max_record_bytes=1 << 21))]
    assert [(line, json.loads(text)) for line, text, _ in got] == list(enumerate(items, start=1))
    small = [(line, error[:9]) for _, line, _, error in
             read_records(str(tmp_path / "a.json"), STORAGE, "data.train", ReadLimits(max_record_bytes=200_000))]
    assert small == [(1, ""), (2, "too_large"), (3, "too_large"), (4, "")]  # skipped to their ends, unkept
    deep = "[" + json.dumps(GOOD) + ", " + "[" * 100_000 + "]" * 100_000 + ", " + json.dumps(GOOD) + "]"
    (tmp_path / "deep.json").write_text(deep)
    assert [(line, error[:8]) for _, line, _, error in read_records(str(tmp_path / "deep.json"), STORAGE, "x")] == [
        (1, ""), (2, "too_deep"), (3, "")]


def test_a_gzip_bomb_is_cut_at_max_decompressed_ratio(tmp_path):

    with gzip.open(tmp_path / "bomb.jsonl.gz", "wb") as f:
        f.write((json.dumps(GOOD) + "\n").encode() * 1000)
        f.write(b" " * (64 << 20))  # 64 MiB of blanks: about 64 KiB compressed
    got = [(line, error) for _, line, _, error in
           read_records(str(tmp_path / "bomb.jsonl.gz"), STORAGE, "data.train", ReadLimits(max_decompressed_ratio=20))]
    assert [error for _, error in got[:1000]] == [""] * 1000
    [(line, error)] = got[1000:]
    assert line == 1001 and error.startswith("too_large: decompressed past ") and "data.max_decompressed_ratio (20)" in error


def test_parquet_reads_only_the_columns_a_format_can_use(tmp_path):
    from ft_ray.config import DataConfig

    table = pa.Table.from_pylist([{"question": "q", "answer": "a", "blob": "x" * 1000}] * 3)
    pq.write_table(table, tmp_path / "c.parquet")
    limits = ReadLimits.of(DataConfig(train="c.parquet", fields={"instruction": "question", "output": "answer"}))
    got = [json.loads(text) for _, _, text, _ in read_records(str(tmp_path / "c.parquet"), STORAGE, "data.train", limits)]
    assert got == [{"question": "q", "answer": "a"}] * 3


def test_nothing_to_read_names_the_key_and_what_was_looked_for(tmp_path):
    (tmp_path / "notes.xlsx").write_bytes(b"PK")
    with pytest.raises(DataError, match=r"data.sources\[1\]: no data files at .* \(looked for .jsonl"):
        list_files(str(tmp_path), STORAGE, "data.sources[1]")
    assert file_kind("x.JSONL.GZ") == "jsonl" and file_kind("x.CSV") == "csv" and file_kind("x.xlsx") is None


def test_auto_format_is_chosen_from_the_first_records_and_said(tmp_path):
    path = tmp_path / "share.jsonl"
    chat = {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]}
    path.write_text("\n".join(json.dumps(r) for r in [chat, chat, {"text": "odd one"}, chat]) + "\n")
    fmt, note = choose_format(SourceConfig(path=str(path), format="auto"), STORAGE, "data.train")
    assert fmt == "chat" and note == f"data.train: format auto -> chat (3 of the first 4 records of {path})"
    mapped = SourceConfig(path=str(path), format="auto", fields={"text": "missing"})
    assert choose_format(mapped, STORAGE, "data.train")[0] == "chat"
    assert choose_format(SourceConfig(path=str(path), format="text"), STORAGE, "k") == ("text", "k: format text (from the config)")
    folder = tmp_path / "parts"  # an empty first file (a failed export) leaves the vote to the next one
    folder.mkdir()
    (folder / "a.jsonl").write_text("")
    (folder / "b.jsonl").write_text(path.read_text())
    assert choose_format(SourceConfig(path=str(folder), format="auto"), STORAGE, "data.train")[1] == (
        f"data.train: format auto -> chat (3 of the first 4 records of 2 files from {folder / 'a.jsonl'})")
    (folder / "b.jsonl").write_text("")
    with pytest.raises(DataError, match=f"^data.train: no records in 2 files from {folder / 'a.jsonl'}$"):
        choose_format(SourceConfig(path=str(folder), format="auto"), STORAGE, "data.train")
    (folder / "b.jsonl").write_text('{"txt": "a"}\n{broken\n')
    with pytest.raises(DataError, match=r"none of the first 2 records of 2 files from .* \(first: .*b.jsonl:1: cannot "
                                        r"tell the format from keys \['txt'\]"):
        choose_format(SourceConfig(path=str(folder), format="auto"), STORAGE, "data.train")


def test_a_line_over_max_record_bytes_is_too_large_and_never_held_in_memory(tmp_path):
    import time
    import tracemalloc


    path = tmp_path / "big.jsonl"
    with open(path, "wb") as f:  # 64 MiB on one line between two good records
        f.write(json.dumps(GOOD).encode() + b'\n{"text": "')
        for _ in range(64):
            f.write(b"x" * (1 << 20))
        f.write(b'"}\n' + json.dumps(GOOD).encode() + b"\n")
    tracemalloc.start()
    started = time.perf_counter()
    got = [(line, text, error) for _, line, text, error in
           read_records(str(path), STORAGE, "data.train", ReadLimits(max_record_bytes=1 << 20))]
    elapsed, peak = time.perf_counter() - started, tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert got[0] == (1, json.dumps(GOOD), "") and got[2] == (3, json.dumps(GOOD), "")
    assert got[1] == (2, "", f"too_large: {64 * (1 << 20) + 12} bytes, over data.max_record_bytes (1048576); not read")
    assert peak < 8 << 20, f"peak {peak / 2**20:.0f} MiB: the line was buffered"
    assert elapsed < 10, elapsed  # linear: a chunk at a time (the old reader re-joined the line per chunk)


def test_byte_ranges_starting_inside_a_long_line_skip_it_without_keeping_it(tmp_path):
    import pyarrow.fs as pafs


    path = tmp_path / "ranges.jsonl"
    lines = [json.dumps(GOOD).encode(), b'{"text": "' + b"y" * 300_000 + b'"}'] * 3
    path.write_bytes(b"\n".join(lines) + b"\n")
    fs, size = pafs.LocalFileSystem(), path.stat().st_size
    limits = ReadLimits(max_record_bytes=100_000)
    whole = [(n, error[:9]) for n, _, error in file_records(open(path, "rb"), str(path), limits=limits)]
    assert whole == [(1, ""), (2, "too_large"), (3, ""), (4, "too_large"), (5, ""), (6, "too_large")]
    bounds = list(range(0, size, 70_001)) + [size]  # most ranges start inside a long line
    counted, before = [], 0  # lines of the file before each range (read_units counts them the same way)
    for start, end in zip(bounds, bounds[1:]):
        with fs.open_input_file(str(path)) as stream:
            stream.seek(max(0, start - 1))
            unit = Unit(str(path), size, start, end, before)
            counted += [(n, error[:9]) for n, _, error in file_records(stream, str(path), unit, limits)]
        before += path.read_bytes()[start:end].count(b"\n")
    assert counted == whole


def test_a_large_parquet_file_is_read_by_runs_of_row_groups_with_the_file_s_row_numbers(tmp_path, monkeypatch):
    import pyarrow.fs as pafs

    from ft_ray.data import sources
    from ft_ray.data.readers import open_file
    from ft_ray.data.sources import read_units

    path = str(tmp_path / "big.parquet")
    pq.write_table(pa.table({"text": [f"record {i} " + "x" * (i % 50) for i in range(1000)],
                             "unused": list(range(1000))}), path, row_group_size=100)
    fs, limits = pafs.LocalFileSystem(), ReadLimits(columns=frozenset({"text"}))
    whole = list(file_records(open_file(fs, path), path, limits=limits))
    monkeypatch.setattr(sources, "RANGE_MIN_BYTES", 1)  # as if the file were past a read span (4 MB)
    units = read_units(fs, [path], cpus=2, in_ray=False, limits=limits)
    assert len(units) > 1 and units[0].row_groups[0] == 0 and units[-1].row_groups[1] == 10  # 4 here
    assert all(a.row_groups[1] == b.row_groups[0] for a, b in zip(units, units[1:]))
    assert sum(u.bytes for u in units) < (tmp_path / "big.parquet").stat().st_size  # their compressed bytes
    pieces = [record for unit in units for record in file_records(open_file(fs, path), path, unit, limits)]
    assert pieces == whole and [line for line, _, _ in whole] == list(range(1, 1001))
    assert json.loads(whole[500][1]) == {"text": "record 500 "}


def test_a_large_csv_file_is_read_in_ranges_that_start_at_rows_with_the_file_s_lines(tmp_path, monkeypatch):
    """Quoted values over several lines, an escaped quote, a quote inside an unquoted value, a
    row that is not CSV, one with a value too many, blank lines, a row too long to keep, CRLF
    and no last newline: read in ranges of any size, the same records, lines and errors as
    read whole (each range's rows parsed with the file's header by a task of its own)."""
    import pyarrow.fs as pafs

    from ft_ray.data import sources

    rows = ['\ufeffinstruction,output', 'plain,one', '"two\nlines","and ""quoted"""', 'a 12" pizza,x',
            '', '"broken"x,y', 'three,values,here', '"a\n\nb",c', 'long,' + 'z' * 400, 'crlf,row\r', 'last,"no\nnewline"']
    path = tmp_path / "big.csv"
    path.write_bytes("\n".join(rows).encode())
    fs, limits = pafs.LocalFileSystem(), ReadLimits(max_record_bytes=300)
    whole = list(file_records(open(path, "rb"), str(path), limits=limits))
    assert [(line, error[:9]) for line, _, error in whole] == [
        (2, ""), (3, ""), (5, ""), (7, "not_csv: "), (8, "not_csv: "), (9, ""), (12, "too_large"), (13, ""), (14, "")]
    assert json.loads(whole[1][1]) == {"instruction": "two\nlines", "output": 'and "quoted"'}
    monkeypatch.setattr(sources, "RANGE_MIN_BYTES", 1)
    for span in (1, 7, 30, 64, 200, 700):
        monkeypatch.setattr(sources, "RANGE_MAX_BYTES", span)
        units = sources.read_units(fs, [str(path)], cpus=1, in_ray=False, limits=limits)
        assert len(units) > 1 if span < 200 else units, span
        read = [(r["line"], r["text"], r["error"]) for unit in units
                for block in sources._read_units(fs, [unit], 100, limits) for r in block.to_pylist()]
        assert read == whole, (span, [u.start for u in units])


def test_a_json_item_with_bytes_that_are_not_utf8_is_rejected_alone(tmp_path):
    (tmp_path / "a.json").write_bytes(b'[{"text": "ok"}, {"text": "caf\xe9"}, {"text": "ok"}]')
    got = [(line, text, error) for _, line, text, error in read_records(str(tmp_path / "a.json"), STORAGE, "x")]
    assert [(line, error) for line, _, error in got] == [(1, ""), (2, "not_utf8: invalid bytes in the item"), (3, "")]
    assert got[1][1] == '{"text": "caf\\xe9"}'


def test_text_files_by_paragraph_or_as_one_document(tmp_path):

    (tmp_path / "d.txt").write_text("\ufefffirst paragraph\nstill first\n\n\nsecond\n\n")
    by = {unit: [(line, json.loads(text)["text"]) for _, line, text, _ in
                 read_records(str(tmp_path / "d.txt"), STORAGE, "x", ReadLimits(text_unit=unit))]
          for unit in ("paragraph", "document")}
    assert by["paragraph"] == [(1, "first paragraph\nstill first"), (5, "second")]
    assert by["document"] == [(1, "first paragraph\nstill first\n\n\nsecond")]


def test_a_paragraph_over_max_record_bytes_is_too_large(tmp_path):

    (tmp_path / "a.txt").write_text("short one\n\n" + "a long line\n" * 20_000 + "\nlast one\n")
    got = [(line, text, error[:9]) for _, line, text, error in
           read_records(str(tmp_path / "a.txt"), STORAGE, "x", ReadLimits(max_record_bytes=100_000,
                                                                           text_unit="paragraph"))]
    assert got == [(1, json.dumps({"text": "short one"}), ""), (3, "", "too_large"),
                   (20_004, json.dumps({"text": "last one"}), "")]
