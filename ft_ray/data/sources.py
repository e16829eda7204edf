"""Where records come from: files under a local path, folder, glob or `s3://` prefix, in
JSONL (optionally .gz), JSON arrays, Parquet or plain text, read as one stream of raw
records, each with its file and line (JSONL, text) or 1-based row (JSON array, Parquet).

The same reader runs inside Ray Data read tasks (`read_corpus`) and in plain Python
(`ft-ray validate`, the format peek), so both see the records the same way.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import functools
import json
import re
from collections import Counter
from pathlib import Path
from typing import Any, Iterator

import pyarrow.fs as pafs

from ft_ray.config import OBJECTIVE_FORMATS, DataConfig, InputError, JobConfig, SourceConfig, StorageConfig
from ft_ray.data.formats import RECORD_FIELDS, RecordError, detect_format, map_fields, uses_tools
from ft_ray.storage import filesystem_for

KINDS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".parquet": "parquet", ".txt": "text",
         ".md": "text", ".arrow": "arrow"}
COMPRESSIONS = (".gz", ".bz2", ".zst", ".lz4")
READ_CHUNK = 1 << 20
PEEK_RECORDS = 20
MAX_RECORD_BYTES = 8 << 20  # data.max_record_bytes' default
MAX_DECOMPRESSED_RATIO = 100.0  # data.max_decompressed_ratio's


class DataError(InputError):
    """The corpus cannot feed a run (no files, too many bad records, nothing left to train on)."""


def file_kind(path: str) -> str | None:
    """jsonl, json, parquet or text from the file name (a compression suffix is looked through)."""
    name = path.lower()
    for suffix in COMPRESSIONS:
        if name.endswith(suffix):
            name = name[: -len(suffix)]
    return next((kind for ext, kind in KINDS.items() if name.endswith(ext)), None)


def list_files(source: SourceConfig | str, storage: StorageConfig,
               key: str = "data.train") -> tuple[pafs.FileSystem, list[str]]:
    """The data files of a source: a file, folder (recursively), glob or s3:// prefix,
    sorted; the Arrow files of a folder written by `save_to_disk` (of its `split` for a
    DatasetDict); or the files of a Hugging Face dataset's split (`hf_files`).

    Raises:
        DataError: nothing with a known extension matches, or no such split.
    """
    source = SourceConfig(path=source) if isinstance(source, str) else source
    if source.hf:
        return hf_files(source, key)
    pattern = source.path
    fs, path = filesystem_for(pattern, storage)
    scheme = "s3://" if pattern.startswith("s3://") else ""
    try:
        if any(ch in path for ch in "*?["):
            base = path[: min(path.index(ch) for ch in "*?[" if ch in path)].rsplit("/", 1)[0]
            found = [i.path for i in fs.get_file_info(pafs.FileSelector(base, recursive=True))
                     if i.type == pafs.FileType.File and fnmatch.fnmatch(i.path, path)]
        else:
            info = fs.get_file_info(path)
            if info.type == pafs.FileType.Directory:
                saved = saved_dataset_files(fs, path, source.split, key)
                if saved is not None:
                    return fs, [scheme + f for f in saved]
                found = [i.path for i in fs.get_file_info(pafs.FileSelector(path, recursive=True))
                         if i.type == pafs.FileType.File]
            else:
                found = [path] if info.type == pafs.FileType.File else []
    except OSError as e:
        raise DataError(f"{key}: cannot list {pattern!r}: {e}") from None
    files = sorted(f for f in found if file_kind(f))
    if not files:
        raise DataError(f"{key}: no data files at {pattern!r} "
                        f"(looked for {', '.join(KINDS)}, optionally compressed: {', '.join(COMPRESSIONS)})")
    return fs, [scheme + f for f in files] if scheme else files


def saved_dataset_files(fs: pafs.FileSystem, folder: str, split: str | None, key: str) -> list[str] | None:
    """The Arrow files of a folder written by `datasets`' `save_to_disk`, in order (of
    `split`, default train, for a DatasetDict), or None for any other folder."""
    def read_json(name: str) -> dict | None:
        try:
            with fs.open_input_stream(f"{folder}/{name}") as f:
                return json.loads(f.read())
        except FileNotFoundError:
            return None

    splits = read_json("dataset_dict.json")
    if splits is not None:
        chosen = split or "train"
        if chosen not in splits.get("splits", []):
            raise DataError(f"{key}: the saved DatasetDict at {folder} has no split {chosen!r} "
                            f"(it has {', '.join(splits.get('splits', []))}); set split in the source")
        return saved_dataset_files(fs, f"{folder}/{chosen}", None, key)
    state = read_json("state.json")
    if state is None:
        return None
    return [f"{folder}/{entry['filename']}" for entry in state.get("_data_files", [])]


def hf_files(source: SourceConfig, key: str) -> tuple[pafs.FileSystem, list[str]]:
    """The data files of a Hugging Face dataset's split, as `datasets` resolves them
    (`load_dataset_builder`: only metadata, no data is downloaded): a hub dataset's files
    at the commit its revision points to (`hf://datasets/ID@COMMIT/...`, read in streams
    through `huggingface_hub`'s filesystem); a local dataset repository folder's files; in
    offline mode (`HF_HUB_OFFLINE=1`), the Arrow files of the dataset in the local cache."""
    split = source.split or "train"
    try:
        urls = _hf_split_files(source.hf, source.subset, source.revision, split)
    except DataError as e:
        raise DataError(f"{key}: {e}") from None
    except Exception as e:  # noqa: BLE001 - no network, no such dataset, no such revision: said as it is
        raise DataError(f"{key}: cannot resolve the Hugging Face dataset {source.where}: "
                        f"{type(e).__name__}: {str(e)[:500]}") from None
    if urls and urls[0].startswith("hf://"):
        from huggingface_hub import HfFileSystem

        return pafs.PyFileSystem(pafs.FSSpecHandler(HfFileSystem())), urls
    unknown = [u for u in urls if not file_kind(u)]
    if unknown:
        raise DataError(f"{key}: {source.where}: files of a kind ft-ray does not read: {unknown[:3]} "
                        f"(it reads {', '.join(KINDS)})")
    return pafs.LocalFileSystem(), urls


@functools.lru_cache(maxsize=16)
def _hf_split_files(name: str, subset: str | None, revision: str | None, split: str) -> list[str]:
    """The split's files: as the dataset names them, or in offline mode the cached Arrow files."""
    import datasets

    builder = datasets.load_dataset_builder(name, subset, revision=revision)
    files = builder.config.data_files
    if files is None:  # offline: the dataset as prepared in the local cache
        available = list(builder.info.splits or {})
        if split not in available:
            raise DataError(f"{name} has no split {split!r} in the local cache (it has {', '.join(available)})")
        return sorted(str(p) for p in Path(builder.cache_dir).glob(f"{builder.dataset_name}-{split}*.arrow"))
    if split not in files:
        raise DataError(f"{name} has no split {split!r} (it has {', '.join(str(s) for s in files)}); "
                        "set split in the source")
    return [str(f) for f in files[split]]


def common_folder(files: list[str]) -> str:
    """The deepest folder holding every one of `files` (`s3://bucket/data` for s3:// keys)."""
    common: list[str] = []
    for level in zip(*(f.split("/")[:-1] for f in files)):
        if len(set(level)) != 1:
            break
        common.append(level[0])
    return "/".join(common)


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


def file_records(stream: Any, path: str, unit: "Unit | None" = None,
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


def _kind_records(stream: Any, path: str, unit: "Unit | None", limits: ReadLimits) -> Iterator[tuple[int, str, str]]:
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
        yield from _table_rows(parquet.iter_batches(batch_size=1024, columns=limits.wanted(parquet.schema_arrow.names)),
                               max_bytes)
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


def _table_rows(batches: Iterator[Any], max_bytes: int) -> Iterator[tuple[int, str, str]]:
    """(row, record as JSON text, error) of each row of Arrow record batches (rows counted from 1)."""
    row = 0
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


def choose_format(source: SourceConfig, storage: StorageConfig, key: str) -> tuple[str, str]:
    """The format of a source and a sentence saying how it was chosen.

    `auto` looks at the first records of the source's first file and takes the most common
    format among them; records of another shape are then rejected with the reason.
    """
    if source.format and source.format != "auto":
        return source.format, f"{key}: format {source.format} (from the config)"
    fs, files = list_files(source, storage, key)
    seen: Counter = Counter()
    tools = 0  # chat records with function calls
    with open_file(fs, files[0]) as stream:
        for checked, (_, text, error) in enumerate(file_records(stream, files[0])):
            if checked >= PEEK_RECORDS:
                break
            try:
                if not error:
                    record = map_fields(json.loads(text), source.fields)
                    seen[detect_format(record)] += 1
                    tools += uses_tools(record)
            except (json.JSONDecodeError, RecordError, RecursionError):  # a bad record is not a format vote
                continue
    if not seen:
        raise DataError(f"{key}: format auto: none of the first records of {files[0]} looks like text, "
                        "instruction, chat, completion, preference or kto; set data.format and data.fields")
    chosen, count = seen.most_common(1)[0]
    with_tools = f", {tools} with tool calls or schemas" if chosen == "chat" and tools else ""
    return chosen, (f"{key}: format auto -> {chosen} ({count} of the first {sum(seen.values())} "
                    f"records of {files[0]}{with_tools})")


def check_format(config: JobConfig, fmt: str, key: str) -> None:
    """Raises DataError when a source's records are not what the job's objective trains on."""
    allowed = OBJECTIVE_FORMATS[config.objective]
    if fmt not in allowed:
        objectives = " or ".join(o for o, formats in OBJECTIVE_FORMATS.items() if fmt in formats)
        raise DataError(f"{key}: records of format {fmt} train with objective {objectives}, not "
                        f"{config.objective} (which needs format {' or '.join(allowed)}); set objective "
                        "in the job file")


@dataclasses.dataclass(frozen=True)
class Unit:
    """What one read task reads: a whole file, or the lines of an uncompressed JSONL file
    that start in [start, end) (`lines_before`: how many lines the file has before them)."""

    path: str
    size: int
    start: int = 0
    end: int | None = None
    lines_before: int = 0

    @property
    def bytes(self) -> int:
        return (self.size if self.end is None else self.end) - self.start


RANGE_MIN_BYTES = 4 << 20
RANGE_MAX_BYTES = 64 << 20


def read_units(fs: pafs.FileSystem, files: list[str], cpus: int, in_ray: bool = True,
               limits: ReadLimits = ReadLimits()) -> list[Unit]:
    """The files as read tasks: large uncompressed files of one record per line (JSONL,
    text read by line) in byte ranges, enough for about two tasks per CPU (4-64 MB each),
    so one large file is read and tokenized by many tasks. A range's first line number
    comes from newline counts of the ranges before it, counted by Ray tasks (the driver
    never reads the corpus) or, without `in_ray`, here."""
    sizes = [info.size or 0 for info in fs.get_file_info([fs_path(f) for f in files])]
    span = read_span(sum(sizes), cpus)
    units = []
    for path, size in zip(files, sizes):
        if not limits.one_line_each(path) or path.lower().endswith(COMPRESSIONS) or size <= span:
            units.append(Unit(path, size))
            continue
        bounds = list(range(0, size, span)) + [size]
        units += [Unit(path, size, start, end) for start, end in zip(bounds, bounds[1:])]
    ranged = [i for i, unit in enumerate(units) if unit.end is not None]
    if ranged and in_ray:
        import ray

        count = ray.remote(num_cpus=1)(_count_newlines)  # fractions start new worker processes
        counts = ray.get([count.remote(fs, units[i]) for i in ranged])
    else:
        counts = [_count_newlines(fs, units[i]) for i in ranged]
    before: dict[str, int] = {}
    for i, newlines in zip(ranged, counts):
        units[i] = dataclasses.replace(units[i], lines_before=before.get(units[i].path, 0))
        before[units[i].path] = units[i].lines_before + newlines
    return units


def read_span(total_bytes: int, cpus: int) -> int:
    """Bytes per read task: about two tasks per CPU, 4-64 MB each."""
    return min(RANGE_MAX_BYTES, max(RANGE_MIN_BYTES, total_bytes // max(1, 2 * cpus)))


def task_groups(units: list[Unit], cpus: int) -> list[list[Unit]]:
    """Consecutive units in groups of about a read span each, balanced by bytes: many
    small files are read by a few tasks (measured on 2 CPUs: a task costs about 0.2 s of
    scheduling), and the tasks come out about equal (groups of "at least a span" had made
    3 tasks of 3, 3 and 2 files on 2 CPUs: one CPU idle through the last).

    A unit goes to the group its middle byte falls in, counting the bytes of all units in
    order and cutting them into equal parts."""
    total = sum(u.bytes for u in units)
    count = max(1, min(len(units), round(total / read_span(total, cpus))))
    groups: list[list[Unit]] = [[] for _ in range(count)]
    done = 0  # bytes of the units before this one
    for unit in units:
        groups[min(count - 1, (2 * done + unit.bytes) * count // max(1, 2 * total))].append(unit)
        done += unit.bytes
    return [group for group in groups if group]


def _count_newlines(fs: pafs.FileSystem, unit: Unit) -> int:
    with fs.open_input_file(fs_path(unit.path)) as f:
        return sum(f.read_at(min(READ_CHUNK, unit.end - at), at).count(b"\n")
                   for at in range(unit.start, unit.end, READ_CHUNK))


def read_corpus(fs: pafs.FileSystem, files: list[str], rows_per_block: int = 4096, spread: bool = False,
                limits: ReadLimits = ReadLimits()) -> Any:
    """A Ray Data dataset of the records of `files` as rows of (path, line, text, error), in
    blocks of up to `rows_per_block` rows.

    One read task per group of `Unit`s, and exactly as many output blocks: Ray Data would otherwise
    split each task's output to reach its default parallelism, and a split read cannot run
    in one task with the map after it (fused, measured on 2 CPUs: read + tokenize of 40k
    records 11.5 s -> 8.2 s). `spread` lets Ray split them, for a map that is slow per
    record and must reach every actor even when the files are few (evaluation).
    """
    import ray
    import ray.data

    cpus = int(ray.cluster_resources().get("CPU", 1))
    groups = task_groups(read_units(fs, files, cpus, limits=limits), cpus)
    datasource = _datasource_class()(fs, groups, rows_per_block, limits)
    return ray.data.read_datasource(datasource, override_num_blocks=-1 if spread else len(groups))


@functools.lru_cache(maxsize=1)
def _datasource_class() -> type:
    """The Ray Data datasource, defined when first used (`ft-ray validate` reads without Ray)."""
    from ray.data.block import BlockMetadata
    from ray.data.datasource import Datasource, ReadTask

    class ReadCorpus(Datasource):
        def __init__(self, fs: pafs.FileSystem, groups: list[list[Unit]], rows_per_block: int, limits: ReadLimits):
            self._fs, self._groups, self._rows_per_block, self._limits = fs, groups, rows_per_block, limits

        def get_name(self) -> str:
            return "Corpus"

        def estimate_inmemory_data_size(self) -> int:
            return sum(u.bytes for group in self._groups for u in group)

        def get_read_tasks(self, parallelism: int, **_: Any) -> list:
            fs, rows_per_block, limits = self._fs, self._rows_per_block, self._limits
            return [ReadTask(functools.partial(_read_units, fs, group, rows_per_block, limits),
                             BlockMetadata(num_rows=None, size_bytes=sum(u.bytes for u in group), exec_stats=None,
                                           input_files=tuple(dict.fromkeys(u.path for u in group))))
                    for group in self._groups]

    return ReadCorpus


def _read_units(fs: pafs.FileSystem, units: list[Unit], rows_per_block: int, limits: ReadLimits) -> Iterator[Any]:
    """The records of `units` as Arrow tables of up to `rows_per_block` rows."""
    import pyarrow as pa

    rows: dict[str, list] = {"path": [], "line": [], "text": [], "error": []}
    for unit in units:
        if unit.end is not None:
            stream = fs.open_input_file(fs_path(unit.path))
            stream.seek(max(0, unit.start - 1))
        else:
            stream = open_file(fs, unit.path, limits)
        with stream:
            for line, text, error in file_records(stream, unit.path, unit, limits):
                for column, value in zip(rows, (unit.path, line, text, error)):
                    rows[column].append(value)
                if len(rows["line"]) >= rows_per_block:
                    yield pa.table(rows)
                    rows = {k: [] for k in rows}
    if rows["line"]:
        yield pa.table(rows)


def read_records(source: SourceConfig | str, storage: StorageConfig, key: str,
                 limits: ReadLimits = ReadLimits()) -> Iterator[tuple[str, int, str, str]]:
    """(file, line or row, record text, error) of every record, in plain Python (no Ray)."""
    fs, files = list_files(source, storage, key)
    for path in files:
        with open_file(fs, path, limits) as stream:
            for line, text, error in file_records(stream, path, limits=limits):
                yield path, line, text, error
