"""Where records come from: files under a local path, folder, glob or `s3://` prefix, in
JSONL (optionally .gz), JSON arrays, Parquet or plain text, read as one stream of raw
records, each with its file and line (JSONL, text) or 1-based row (JSON array, Parquet).

The same reader runs inside Ray Data read tasks (`CorpusDatasource`) and in plain Python
(`ft-ray validate`, the format peek), so both see the records the same way.
"""

from __future__ import annotations

import fnmatch
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


def file_records(stream: Any, path: str) -> Iterator[tuple[int, str, str]]:
    """(line or row, record as JSON text, error) for each record of an open file.

    An error (not UTF-8, a JSON file that does not parse) is reported per record with the
    raw text, so the pipeline can set it aside without losing its neighbours.
    """
    kind = file_kind(path)
    if kind == "jsonl":
        for number, raw in _lines(stream):
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


def _lines(stream: Any) -> Iterator[tuple[int, bytes]]:
    """Lines of a binary stream read in chunks (pyarrow streams have no readline)."""
    rest, number = b"", 0
    while True:
        chunk = stream.read(READ_CHUNK)
        if not chunk:
            break
        parts = (rest + chunk).split(b"\n")
        rest = parts.pop()
        for part in parts:
            number += 1
            yield number, part.rstrip(b"\r")
    if rest:
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
    inner = path[len("s3://"):] if path.startswith("s3://") else path
    if file_kind(path) == "parquet":
        return fs.open_input_file(inner)
    return fs.open_input_stream(inner, compression="detect")


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


def corpus_datasource(fs: pafs.FileSystem, files: list[str], rows_per_block: int = 4096) -> Any:
    """A Ray Data datasource that streams `files` as rows of (path, line, text, error), in
    blocks of up to `rows_per_block` rows (a block is what one task or actor call takes)."""
    import pyarrow as pa
    from ray.data.datasource import FileBasedDatasource

    scheme = "s3://" if files[0].startswith("s3://") else ""

    class CorpusDatasource(FileBasedDatasource):
        def _open_input_source(self, filesystem, path, **open_args):
            if file_kind(path) == "parquet":
                return filesystem.open_input_file(path)
            return super()._open_input_source(filesystem, path, **open_args)

        def _read_stream(self, f, path):
            rows: dict[str, list] = {"path": [], "line": [], "text": [], "error": []}
            for line, text, error in file_records(f, path):
                for column, value in zip(rows, (scheme + path, line, text, error)):
                    rows[column].append(value)
                if len(rows["line"]) >= rows_per_block:
                    yield pa.table(rows)
                    rows = {k: [] for k in rows}
            if rows["line"]:
                yield pa.table(rows)

    inner = [f[len(scheme):] for f in files]
    return CorpusDatasource(inner, filesystem=fs)


def read_records(pattern: str, storage: StorageConfig, key: str) -> Iterator[tuple[str, int, str, str]]:
    """(file, line or row, record text, error) of every record, in plain Python (no Ray)."""
    fs, files = list_files(pattern, storage, key)
    for path in files:
        with open_file(fs, path) as stream:
            for line, text, error in file_records(stream, path):
                yield path, line, text, error
