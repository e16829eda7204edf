"""How one data file's bytes become raw records: JSONL (optionally compressed, or a byte
range of it), JSON arrays, Parquet, Arrow or plain text, each record with its line or row,
or with the reason it cannot be kept (not UTF-8, not JSON, too long, a compressed file past
its ratio). `sources` lists the files and hands them to these readers, in Ray Data read tasks
or in plain Python.
"""

from __future__ import annotations

import dataclasses
import json
import re
from typing import Any, Iterator

import pyarrow.fs as pafs

from ft_ray.config import DataConfig, SourceConfig
from ft_ray.data.formats import RECORD_FIELDS

KINDS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".parquet": "parquet", ".txt": "text",
         ".md": "text", ".arrow": "arrow", ".csv": "csv", ".tsv": "tsv"}
DELIMITERS = {"csv": ",", "tsv": "\t"}
COMPRESSIONS = (".gz", ".bz2", ".zst", ".lz4")
READ_CHUNK = 1 << 20
MAX_RECORD_BYTES = 8 << 20  # data.max_record_bytes' default
MAX_DECOMPRESSED_RATIO = 100.0  # data.max_decompressed_ratio's
UTF8_BOM = "\ufeff".encode()


def file_kind(path: str) -> str | None:
    """jsonl, json, parquet, arrow, csv, tsv or text from the file name (a compression suffix is looked through)."""
    name = path.lower()
    for suffix in COMPRESSIONS:
        if name.endswith(suffix):
            name = name[: -len(suffix)]
    return next((kind for ext, kind in KINDS.items() if name.endswith(ext)), None)


@dataclasses.dataclass(frozen=True)
class Unit:
    """What one read task reads: a whole file, the lines of an uncompressed JSONL file that
    start in [start, end) (`lines_before`: how many lines the file has before them), the rows
    of an uncompressed CSV/TSV file in [start, end), both row starts (`header`: the file's;
    `lines_before` as JSONL's), or the row groups [first, end) of a Parquet file
    (`row_groups`; `lines_before`: the rows before them; `group_bytes`: their compressed size)."""

    path: str
    size: int
    start: int = 0
    end: int | None = None
    lines_before: int = 0
    row_groups: tuple[int, int] | None = None
    group_bytes: int = 0
    header: tuple[str, ...] | None = None  # a CSV/TSV range's: the file's first row

    @property
    def bytes(self) -> int:
        if self.row_groups is not None:
            return self.group_bytes
        return (self.size if self.end is None else self.end) - self.start


@dataclasses.dataclass(frozen=True)
class ReadLimits:
    """What reading one source may cost: no record is held past `max_record_bytes`, no
    compressed file decompresses past `max_decompressed_ratio` times its size, and Parquet
    files give only `columns` (None: all), the ones a record format can use. `text_unit`:
    what one record of a plain-text file is (`data.text_unit`)."""

    max_record_bytes: int = MAX_RECORD_BYTES
    max_decompressed_ratio: float = MAX_DECOMPRESSED_RATIO
    columns: frozenset[str] | None = None
    text_unit: str = "line"

    @classmethod
    def of(cls, data: DataConfig, source: SourceConfig | None = None) -> "ReadLimits":
        fields = (source.fields if source else None) or data.fields
        return cls(data.max_record_bytes, data.max_decompressed_ratio,
                   frozenset(fields.get(name, name) for name in RECORD_FIELDS), data.text_unit)

    def wanted(self, names: list[str]) -> list[str]:
        """The columns of a table to read: those a record format can use."""
        return names if self.columns is None else [n for n in names if n in self.columns]

    def one_line_each(self, path: str) -> bool:
        """Whether each record of the file is one line (JSONL, or text read by line): such a
        file can be read in byte ranges."""
        kind = file_kind(path)
        return kind == "jsonl" or (kind == "text" and self.text_unit == "line")


class DecompressionLimit(Exception):
    """A compressed file grew past `data.max_decompressed_ratio` times its size."""


class BoundedStream:
    """A decompressing stream that stops past `ratio` times the compressed size (a gzip bomb
    would otherwise fill memory and disk in a read task)."""

    def __init__(self, stream: Any, compressed_size: int, ratio: float):
        self._stream, self._limit, self._read = stream, max(int(compressed_size * ratio), 1 << 20), 0
        self._compressed, self._ratio = compressed_size, ratio

    def read(self, n: int = -1) -> bytes:
        data = self._stream.read(n) if n >= 0 else self._stream.read()
        self._read += len(data)
        if self._read > self._limit:
            raise DecompressionLimit(
                f"decompressed past {self._read} bytes from {self._compressed}, over data.max_decompressed_ratio "
                f"({self._ratio:g}); the rest of the file is not read (raise the setting if the file is genuine)")
        return data

    def __enter__(self) -> "BoundedStream":
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stream.close()


def file_records(stream: Any, path: str, unit: Unit | None = None,
                 limits: ReadLimits = ReadLimits()) -> Iterator[tuple[int, str, str]]:
    """(line or row, record as JSON text, error) for each record of an open file, or of a
    byte range of an uncompressed JSONL file (`unit`; the stream opened at `unit.start - 1`).

    An error (not UTF-8, not JSON, a record longer than `limits.max_record_bytes`, a
    compressed file past its ratio) is reported per record with the raw text (none for a
    record too long to keep), so the pipeline can set it aside without losing its neighbours;
    a file given up on (past its ratio, a JSON array broken mid-way) ends with one such record.
    """
    last = 0
    try:
        for last, text, error in _kind_records(stream, path, unit, limits):
            yield last, text, error
    except DecompressionLimit as e:
        yield last + 1, "", f"too_large: {e}"


def _kind_records(stream: Any, path: str, unit: Unit | None, limits: ReadLimits) -> Iterator[tuple[int, str, str]]:
    kind, max_bytes = file_kind(path), limits.max_record_bytes
    if limits.one_line_each(path):
        ranged = unit is not None and unit.end is not None
        lines = (_lines(stream, unit.lines_before, unit.start > 0, unit.end - unit.start + (unit.start > 0), max_bytes)
                 if ranged else _lines(stream, max_bytes=max_bytes))
        for number, raw, size in lines:
            if raw is None:
                yield number, "", too_large(size, max_bytes)
            elif raw.strip():
                text, error = _decode(raw)
                yield number, (json.dumps({"text": text}, ensure_ascii=False) if kind == "text" and not error
                               else text), error
    elif kind == "text":
        yield from _paragraphs(stream, max_bytes, whole=limits.text_unit == "document")
    elif kind == "json":
        yield from JsonItems(stream, max_bytes).items()
    elif kind == "parquet":
        import pyarrow.parquet as pq

        parquet = pq.ParquetFile(stream)
        groups = range(*unit.row_groups) if unit is not None and unit.row_groups is not None else None
        yield from _table_rows(parquet.iter_batches(batch_size=1024, row_groups=groups,
                                                    columns=limits.wanted(parquet.schema_arrow.names)),
                               max_bytes, unit.lines_before if groups is not None else 0)
    elif kind in DELIMITERS:
        yield from _delimited_rows(stream, DELIMITERS[kind], max_bytes, unit)
    elif kind == "arrow":  # datasets' Arrow files: the IPC stream format (or the file format)
        import pyarrow as pa

        try:
            reader = pa.ipc.open_stream(stream)
            batches = iter(reader)
        except pa.ArrowInvalid:
            stream.seek(0)
            reader = pa.ipc.open_file(stream)
            batches = (reader.get_batch(i) for i in range(reader.num_record_batches))
        wanted = limits.wanted(reader.schema.names)
        yield from _table_rows((batch.select(wanted) for batch in batches), max_bytes)


def _delimited_rows(stream: Any, delimiter: str, max_bytes: int,
                    unit: Unit | None = None) -> Iterator[tuple[int, str, str]]:
    """(line, record as JSON text, error) of each row of a CSV or TSV file whose first line
    names the columns: every value a string (as written; an empty cell is ""), a quoted value
    may run over lines. A row that is not valid CSV, or whose values do not match the header,
    is rejected alone, with its first line's number and its lines as written. A range of a
    large file (`unit.header` set: the stream opened at `unit.start`, a row's first byte) has
    the file's header and line numbers."""
    ranged = unit is not None and unit.header is not None
    header = list(unit.header) if ranged else None
    rows = (_csv_rows(stream, delimiter, max_bytes, unit.lines_before, unit.end - unit.start) if ranged
            else _csv_rows(stream, delimiter, max_bytes))
    for line, row, written, error, _, _ in rows:
        if not error and header is not None and len(row) != len(header) and any(row):
            error = f"not_csv: {len(row)} values, the header names {len(header)} columns (a delimiter or quote out of place?)"
        if header is None and error:
            yield line, "", f"{error}; the header line could not be read, the file is skipped"
            return
        if error:
            yield line, written if len(written) <= max_bytes else "", error
        elif not any(row):
            continue  # a blank line
        elif header is None:
            header = row
        else:
            text = json.dumps(dict(zip(header, row)), ensure_ascii=False)
            yield (line, "", too_large(len(text), max_bytes)) if len(text) > max_bytes else (line, text, "")


def _csv_rows(stream: Any, delimiter: str, max_bytes: int, lines_before: int = 0,
              limit: int | None = None) -> Iterator[tuple[int, list[str], str, str, int, int]]:
    """(first line, values, lines as written, error, lines read, bytes read) of each row the
    CSV parser reads from the stream, which holds `lines_before` lines of the file before it
    (a range's rows: those starting before `limit` bytes)."""
    import csv

    fed: dict[str, Any] = {"line": lines_before, "lines": [], "error": "", "bytes": 0}  # read since the last row

    def lines() -> Iterator[str]:
        for number, raw, size in _lines(stream, lines_before, limit=limit, max_bytes=max_bytes):
            text, error = _decode(raw) if raw is not None else ("", too_large(size, max_bytes))
            fed["line"], fed["error"], fed["bytes"] = number, fed["error"] or error, fed["bytes"] + size + 1
            fed["lines"].append(text)
            yield text + "\n"

    csv.field_size_limit(max(max_bytes, csv.field_size_limit()))  # a process-wide limit, 128 KiB by default
    parser, start = csv.reader(lines(), delimiter=delimiter, strict=True), lines_before + 1
    while True:
        try:
            row, error = next(parser), ""
        except StopIteration:
            return
        except csv.Error as e:
            row, error = [], f"not_csv: {e}"
        line, start, written, error = start, fed["line"] + 1, "\n".join(fed["lines"]), fed["error"] or error
        fed.update(lines=[], error="")
        yield line, row, written, error, fed["line"], fed["bytes"]


def delimited_ranges(stream: Any, path: str, size: int, span: int, max_bytes: int) -> list[Unit]:
    """A large uncompressed CSV or TSV file as ranges of about `span` bytes that start where a
    row starts (found by parsing it once, as a quoted value may hold newlines), each with the
    header and the lines before it; the file whole when its header cannot be read."""
    header, ranges, at, lines = None, [], 0, 0
    for _, row, _, error, lines_read, bytes_read in _csv_rows(stream, DELIMITERS[file_kind(path)], max_bytes):
        if header is None:
            if error:
                return [Unit(path, size)]
            if any(row):  # the ranges start after it
                header, at, lines = row, bytes_read, lines_read
        elif bytes_read - at >= span and bytes_read < size:
            ranges.append((at, bytes_read, lines))
            at, lines = bytes_read, lines_read
    if header is None or not ranges:
        return [Unit(path, size)]
    ranges.append((at, size, lines))
    return [Unit(path, size, start, end, before, header=tuple(header)) for start, end, before in ranges]


def _table_rows(batches: Iterator[Any], max_bytes: int, rows_before: int = 0) -> Iterator[tuple[int, str, str]]:
    """(row, record as JSON text, error) of each row of Arrow record batches (the file's rows
    counted from 1; `rows_before`: the file's rows before these batches)."""
    row = rows_before
    for batch in batches:
        for record in batch.to_pylist():
            row += 1
            text = json.dumps(record, ensure_ascii=False, default=str)
            yield (row, "", too_large(len(text), max_bytes)) if len(text) > max_bytes else (row, text, "")


def _lines(stream: Any, number: int = 0, skip_partial: bool = False, limit: int | None = None,
           max_bytes: int = MAX_RECORD_BYTES) -> Iterator[tuple[int, bytes | None, int]]:
    """(number, bytes, length) of each line of a binary stream read in chunks (pyarrow
    streams have no readline). A line longer than `max_bytes` comes as (number, None,
    length): read past to its newline without being kept, so a 2 GB line costs one chunk of
    memory and linear time.

    For a byte range of a file (`Unit`): `number` is the count of lines before the range;
    with `skip_partial` the stream starts one byte before the range and what runs up to
    the first newline belongs to the range before (skipped the same way, never kept); lines
    starting `limit` bytes or more into the stream belong to the range after.
    """
    pieces: list[bytes] | None = None if skip_partial else []  # the open line's bytes; None: not kept
    size = offset = 0  # the open line's length so far, and where it starts in the stream

    def add(piece: bytes) -> None:
        nonlocal pieces, size
        size += len(piece)
        if pieces is not None and size > max_bytes:
            pieces = None  # too long to keep: only its length is counted from here on
        elif pieces is not None:
            pieces.append(piece)

    def close() -> tuple[int, bytes | None, int] | None:
        """End the open line; what to yield for it, or None for the previous range's line."""
        nonlocal pieces, size, offset, number, skip_partial
        line, length = (b"".join(pieces) if pieces is not None else None), size
        offset, pieces, size = offset + length + 1, [], 0
        if skip_partial:
            skip_partial = False
            number += 1 if length else 0  # a newline inside the range ended the previous range's line
            return None
        number += 1
        if number == 1 and line is not None:
            line = line.removeprefix(UTF8_BOM)  # Windows tools (Notepad, Excel's exports) start files with one
        return number, (line.rstrip(b"\r") if line is not None else None), length

    def past_limit() -> bool:  # the open line starts in the range after this one
        return limit is not None and not skip_partial and offset >= limit

    while not past_limit() and (chunk := stream.read(READ_CHUNK)):
        *complete, last = chunk.split(b"\n")
        for piece in complete:
            add(piece)
            if past_limit():
                return
            if (line := close()) is not None:
                yield line
        add(last)
    if size and not skip_partial and not past_limit():
        yield close()


def too_large(size: int, max_bytes: int) -> str:
    return f"too_large: {size} bytes, over data.max_record_bytes ({max_bytes}); not read"


def _decode(raw: bytes) -> tuple[str, str]:
    try:
        return raw.decode("utf-8"), ""
    except UnicodeDecodeError as e:
        return raw.decode("utf-8", errors="backslashreplace"), f"not_utf8: invalid byte at offset {e.start}"


def _paragraphs(stream: Any, max_bytes: int = MAX_RECORD_BYTES, whole: bool = False) -> Iterator[tuple[int, str, str]]:
    """Plain text: one record per paragraph (blocks separated by blank lines), or with
    `whole` the file; a record longer than `max_bytes` is too_large, its lines read past
    and not kept."""
    block: list[str] | None = []  # None: the paragraph grew past max_bytes
    start = size = 0
    for number, raw, length in _lines(stream, max_bytes=max_bytes):
        text, error = _decode(raw) if raw is not None else ("", "")
        if error:
            yield number, text, error
            continue
        if raw is None or text.strip() or (whole and start):
            start, size = start or number, size + length + 1
            if block is not None and size <= max_bytes:
                block.append(text)
            else:
                block = None
            continue
        if start:
            yield _paragraph(start, block, size, max_bytes)
            block, start, size = [], 0, 0
    if start:
        yield _paragraph(start, block, size, max_bytes)


def _paragraph(start: int, block: list[str] | None, size: int, max_bytes: int) -> tuple[int, str, str]:
    if block is None:
        return start, "", too_large(size, max_bytes)
    return start, json.dumps({"text": "\n".join(block).rstrip()}, ensure_ascii=False), ""


class JsonItems:
    """The items of a JSON array read a chunk at a time. An item longer than `max_bytes`, or
    nested too deeply to parse, is skipped by scanning for its end without keeping it; a
    syntax error ends the file with one rejected record (what follows cannot be told apart
    from the broken item)."""

    SPECIAL = re.compile(r'["\[\]{},]')  # what moves an item's end outside strings
    IN_STRING = re.compile(r'["\\]')  # what moves it inside one

    def __init__(self, stream: Any, max_bytes: int):
        self.stream, self.max_bytes = stream, max_bytes
        self.buffer, self.at, self.pending = "", 0, b""  # pending: a character cut by the chunk's end

    def more(self, keep: bool = True) -> bool:
        """Read a chunk after what is left from `at` (or instead of it, `keep=False`); False at the end."""
        chunk = self.stream.read(READ_CHUNK)
        data = self.pending + chunk
        cut = _partial_utf8(data) if chunk else 0
        self.pending = data[len(data) - cut:] if cut else b""
        text = data[:len(data) - cut].decode("utf-8", errors="surrogateescape")
        self.buffer, self.at = (self.buffer[self.at:] if keep else "") + text, 0
        return bool(chunk)

    def next_char(self, wanted: str) -> str:
        """Skip blanks; the next character if it is one of `wanted`, else ""."""
        while True:
            while self.at < len(self.buffer) and self.buffer[self.at] in " \t\r\n\ufeff":
                self.at += 1
            if self.at < len(self.buffer) or not self.more():
                return self.buffer[self.at] if self.at < len(self.buffer) and self.buffer[self.at] in wanted else ""

    def items(self) -> Iterator[tuple[int, str, str]]:
        self.more()
        in_array = self.next_char("[") == "["
        self.at += in_array
        row = 0
        while not (in_array and self.next_char("]") == "]"):
            row += 1
            try:
                end, problem = self.decode()
            except json.JSONDecodeError as e:
                yield row, self.buffer[self.at:self.at + 2000], f"not_json: {e.msg} (item {row}); the rest of the file is skipped"
                return
            if problem:
                yield row, "", problem
            elif _has_escaped_bytes(self.buffer, self.at, end):
                raw = self.buffer[self.at:end].encode("utf-8", "surrogateescape")
                yield row, raw.decode("utf-8", "backslashreplace"), "not_utf8: invalid bytes in the item"
            else:  # the item's own text: valid UTF-8 (an escaped "\ud800" stays escaped for the parser to judge)
                yield row, self.buffer[self.at:end], ""
            self.at = end
            separator = self.next_char(",]") if in_array else "]"
            if separator == "]":
                return
            if not separator:
                yield row + 1, self.buffer[self.at:self.at + 2000], \
                    f"not_json: expected ',' or ']' after item {row}; the rest of the file is skipped"
                return
            self.at += 1

    def decode(self) -> tuple[int, str]:
        """(where the item at `at` ends, "") or (its end, why it was rejected, unread or too long).

        Raises:
            json.JSONDecodeError: the item is not JSON.
        """
        while True:
            try:
                _, end = json.JSONDecoder().raw_decode(self.buffer, self.at)
                if end - self.at > self.max_bytes:  # it fitted in the chunks read: rejected all the same
                    return end, too_large(end - self.at, self.max_bytes)
                return end, ""
            except json.JSONDecodeError:
                if len(self.buffer) - self.at > self.max_bytes:
                    return self.skip_item("too_large")
                if not self.more():
                    raise
            except RecursionError:
                return self.skip_item("too_deep")

    def skip_item(self, reason: str) -> tuple[int, str]:
        """Scan to the end of the item at `at` by its brackets and strings, keeping at most a
        chunk; returns (its end in the buffer, the rejection)."""
        depth, in_string, escaped, skipped = 0, False, False, 0
        while True:
            if self.at >= len(self.buffer):
                skipped += len(self.buffer)
                if not self.more(keep=False):
                    return self.at, f"{reason}: an item of {skipped} characters or more; not read"
                self.at, escaped = int(escaped), False  # an escaped character opened the new chunk
            match = (self.IN_STRING if in_string else self.SPECIAL).search(self.buffer, self.at)
            if match is None:
                self.at = len(self.buffer)
                continue
            char, self.at = match.group(), match.end()
            done = None  # where the item ends, once known
            if in_string and char == "\\":
                escaped, self.at = self.at >= len(self.buffer), self.at + 1
            elif char == '"':
                in_string = not in_string
                done = self.at if depth == 0 and not in_string else None
            elif char in "[{":
                depth += 1
            elif char in "]}" and depth > 0:
                depth -= 1
                done = self.at if depth == 0 else None
            elif depth == 0:  # a ',' or the array's ']' after a scalar
                done = match.start()
            if done is not None:
                return done, f"{reason}: an item of {skipped + done} characters or more; not read"


def _partial_utf8(data: bytes) -> int:
    """How many bytes at the end of `data` start a UTF-8 character that is cut off."""
    for back in range(1, min(4, len(data)) + 1):
        byte = data[-back]
        if byte & 0xC0 != 0x80:  # a lead byte (or ASCII)
            need = 2 if byte & 0xE0 == 0xC0 else 3 if byte & 0xF0 == 0xE0 else 4 if byte & 0xF8 == 0xF0 else 1
            return back if need > back else 0
    return 0


def _has_escaped_bytes(buffer: str, start: int, end: int) -> bool:
    """Whether an item holds bytes that were not UTF-8 (kept as surrogates U+DC80-U+DCFF)."""
    return any("\udc80" <= ch <= "\udcff" for ch in buffer[start:end])


def open_file(fs: pafs.FileSystem, path: str, limits: ReadLimits = ReadLimits()) -> Any:
    """A stream of a data file; Parquet needs random access, the rest is read sequentially,
    a compressed file through a `BoundedStream`."""
    if file_kind(path) in ("parquet", "arrow"):
        return fs.open_input_file(fs_path(path))
    if not path.lower().endswith(COMPRESSIONS):
        return fs.open_input_stream(fs_path(path))
    size = fs.get_file_info(fs_path(path)).size or 0
    return BoundedStream(fs.open_input_stream(fs_path(path), compression="detect"), size,
                         limits.max_decompressed_ratio)


def fs_path(path: str) -> str:
    """A listed file's path as its filesystem takes it (no s3:// or hf:// scheme)."""
    return path.split("://", 1)[1] if path.startswith(("s3://", "hf://")) else path
