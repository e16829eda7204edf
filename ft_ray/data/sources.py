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
from collections import Counter
from typing import Any, Iterator

import pyarrow.fs as pafs

from ft_ray.config import InputError, SourceConfig, StorageConfig
from ft_ray.data.formats import RecordError, detect_format, map_fields
from ft_ray.storage import filesystem_for

KINDS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".parquet": "parquet", ".txt": "text",
         ".md": "text"}
COMPRESSIONS = (".gz", ".bz2", ".zst", ".lz4")
READ_CHUNK = 1 << 20
PEEK_RECORDS = 20


class DataError(InputError):
    """The corpus cannot feed a run (no files, too many bad records, nothing left to train on)."""


def file_kind(path: str) -> str | None:
    """jsonl, json, parquet or text from the file name (a compression suffix is looked through)."""
    name = path.lower()
    for suffix in COMPRESSIONS:
        if name.endswith(suffix):
            name = name[: -len(suffix)]
    return next((kind for ext, kind in KINDS.items() if name.endswith(ext)), None)


def list_files(pattern: str, storage: StorageConfig, key: str = "data.train") -> tuple[pafs.FileSystem, list[str]]:
    """The data files of a file, folder (recursively), glob or s3:// prefix, sorted.

    Raises:
        DataError: nothing with a known extension matches.
    """
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


def file_records(stream: Any, path: str, unit: "Unit | None" = None) -> Iterator[tuple[int, str, str]]:
    """(line or row, record as JSON text, error) for each record of an open file, or of a
    byte range of an uncompressed JSONL file (`unit`; the stream opened at `unit.start - 1`).

    An error (not UTF-8, a JSON file that does not parse) is reported per record with the
    raw text, so the pipeline can set it aside without losing its neighbours.
    """
    kind = file_kind(path)
    if kind == "jsonl":
        ranged = unit is not None and unit.end is not None
        lines = (_lines(stream, unit.lines_before, unit.start > 0, unit.end - unit.start + (unit.start > 0))
                 if ranged else _lines(stream))
        for number, raw in lines:
            if raw.strip():
                yield (number, *_decode(raw))
    elif kind == "text":
        yield from _paragraphs(stream)
    elif kind == "json":
        yield from _json_items(stream.read())
    elif kind == "parquet":
        import pyarrow.parquet as pq

        row = 0
        for batch in pq.ParquetFile(stream).iter_batches(batch_size=1024):
            for record in batch.to_pylist():
                row += 1
                yield row, json.dumps(record, ensure_ascii=False, default=str), ""


def _lines(stream: Any, number: int = 0, skip_partial: bool = False,
           limit: int | None = None) -> Iterator[tuple[int, bytes]]:
    """Numbered lines of a binary stream read in chunks (pyarrow streams have no readline).

    For a byte range of a file (`Unit`): `number` is the count of lines before the range;
    with `skip_partial` the stream starts one byte before the range and what runs up to
    the first newline belongs to the range before; lines starting `limit` bytes or more
    into the stream belong to the range after.
    """
    rest, offset = b"", 0  # offset: where `rest` starts in the stream
    while True:
        chunk = stream.read(READ_CHUNK)
        if not chunk:
            break
        parts = (rest + chunk).split(b"\n")
        rest = parts.pop()
        for part in parts:
            start, offset = offset, offset + len(part) + 1
            if skip_partial:
                skip_partial = False
                number += 1 if part else 0  # a newline inside the range ended the previous range's line
                continue
            if limit is not None and start >= limit:
                return
            number += 1
            yield number, part.rstrip(b"\r")
    if rest and not skip_partial and (limit is None or offset < limit):
        yield number + 1, rest.rstrip(b"\r")


def _decode(raw: bytes) -> tuple[str, str]:
    try:
        return raw.decode("utf-8"), ""
    except UnicodeDecodeError as e:
        return raw.decode("utf-8", errors="backslashreplace"), f"not_utf8: invalid byte at offset {e.start}"


def _paragraphs(stream: Any) -> Iterator[tuple[int, str, str]]:
    """Plain text: one record per paragraph (blocks separated by blank lines)."""
    block: list[str] = []
    start = 0
    for number, raw in _lines(stream):
        text, error = _decode(raw)
        if error:
            yield number, text, error
            continue
        if text.strip():
            start = start or number
            block.append(text)
        elif block:
            yield start, json.dumps({"text": "\n".join(block)}, ensure_ascii=False), ""
            block, start = [], 0
    if block:
        yield start, json.dumps({"text": "\n".join(block)}, ensure_ascii=False), ""


def _json_items(data: bytes) -> Iterator[tuple[int, str, str]]:
    """A JSON file: an array of records (row = index + 1), or one record."""
    text, error = _decode(data)
    if error:
        yield 1, text[:2000], error
        return
    try:
        parsed = json.loads(text)
    except json.JSONDecodeError as e:
        yield e.lineno, text[:2000], f"not_json: {e.msg} (line {e.lineno}, column {e.colno}); the file is skipped"
        return
    for row, item in enumerate(parsed if isinstance(parsed, list) else [parsed], start=1):
        yield row, json.dumps(item, ensure_ascii=False), ""


def open_file(fs: pafs.FileSystem, path: str) -> Any:
    """A stream of a data file; Parquet needs random access, the rest is read sequentially."""
    if file_kind(path) == "parquet":
        return fs.open_input_file(fs_path(path))
    return fs.open_input_stream(fs_path(path), compression="detect")


def fs_path(path: str) -> str:
    """A listed file's path as its filesystem takes it (no s3:// scheme)."""
    return path[len("s3://"):] if path.startswith("s3://") else path


def choose_format(source: SourceConfig, storage: StorageConfig, key: str) -> tuple[str, str]:
    """The format of a source and a sentence saying how it was chosen.

    `auto` looks at the first records of the source's first file and takes the most common
    format among them; records of another shape are then rejected with the reason.
    """
    if source.format and source.format != "auto":
        return source.format, f"{key}: format {source.format} (from the config)"
    fs, files = list_files(source.path, storage, key)
    seen: Counter = Counter()
    with open_file(fs, files[0]) as stream:
        for checked, (_, text, error) in enumerate(file_records(stream, files[0])):
            if checked >= PEEK_RECORDS:
                break
            try:
                if not error:
                    seen[detect_format(map_fields(json.loads(text), source.fields))] += 1
            except (json.JSONDecodeError, RecordError):
                continue
    if not seen:
        raise DataError(f"{key}: format auto: none of the first records of {files[0]} looks like text, "
                        "instruction, chat or completion; set data.format and data.fields")
    chosen, count = seen.most_common(1)[0]
    return chosen, (f"{key}: format auto -> {chosen} ({count} of the first {sum(seen.values())} "
                    f"records of {files[0]})")


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


def read_units(fs: pafs.FileSystem, files: list[str], cpus: int, in_ray: bool = True) -> list[Unit]:
    """The files as read tasks: large uncompressed JSONL files in byte ranges, enough for
    about two tasks per CPU (4-64 MB each), so one large file is read and tokenized by
    many tasks. A range's first line number comes from newline counts of the ranges
    before it, counted by Ray tasks (the driver never reads the corpus) or, without
    `in_ray`, here."""
    sizes = [info.size or 0 for info in fs.get_file_info([fs_path(f) for f in files])]
    span = read_span(sum(sizes), cpus)
    units = []
    for path, size in zip(files, sizes):
        if file_kind(path) != "jsonl" or path.lower().endswith(COMPRESSIONS) or size <= span:
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


def read_corpus(fs: pafs.FileSystem, files: list[str], rows_per_block: int = 4096, spread: bool = False) -> Any:
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
    groups = task_groups(read_units(fs, files, cpus), cpus)
    datasource = _datasource_class()(fs, groups, rows_per_block)
    return ray.data.read_datasource(datasource, override_num_blocks=-1 if spread else len(groups))


@functools.lru_cache(maxsize=1)
def _datasource_class() -> type:
    """The Ray Data datasource, defined when first used (`ft-ray validate` reads without Ray)."""
    from ray.data.block import BlockMetadata
    from ray.data.datasource import Datasource, ReadTask

    class ReadCorpus(Datasource):
        def __init__(self, fs: pafs.FileSystem, groups: list[list[Unit]], rows_per_block: int):
            self._fs, self._groups, self._rows_per_block = fs, groups, rows_per_block

        def get_name(self) -> str:
            return "Corpus"

        def estimate_inmemory_data_size(self) -> int:
            return sum(u.bytes for group in self._groups for u in group)

        def get_read_tasks(self, parallelism: int, **_: Any) -> list:
            fs, rows_per_block = self._fs, self._rows_per_block
            return [ReadTask(functools.partial(_read_units, fs, group, rows_per_block),
                             BlockMetadata(num_rows=None, size_bytes=sum(u.bytes for u in group), exec_stats=None,
                                           input_files=tuple(dict.fromkeys(u.path for u in group))))
                    for group in self._groups]

    return ReadCorpus


def _read_units(fs: pafs.FileSystem, units: list[Unit], rows_per_block: int) -> Iterator[Any]:
    """The records of `units` as Arrow tables of up to `rows_per_block` rows."""
    import pyarrow as pa

    rows: dict[str, list] = {"path": [], "line": [], "text": [], "error": []}
    for unit in units:
        if unit.end is not None:
            stream = fs.open_input_file(fs_path(unit.path))
            stream.seek(max(0, unit.start - 1))
        else:
            stream = open_file(fs, unit.path)
        with stream:
            for line, text, error in file_records(stream, unit.path, unit):
                for column, value in zip(rows, (unit.path, line, text, error)):
                    rows[column].append(value)
                if len(rows["line"]) >= rows_per_block:
                    yield pa.table(rows)
                    rows = {k: [] for k in rows}
    if rows["line"]:
        yield pa.table(rows)


def read_records(pattern: str, storage: StorageConfig, key: str) -> Iterator[tuple[str, int, str, str]]:
    """(file, line or row, record text, error) of every record, in plain Python (no Ray)."""
    fs, files = list_files(pattern, storage, key)
    for path in files:
        with open_file(fs, path) as stream:
            for line, text, error in file_records(stream, path):
                yield path, line, text, error
