"""Where records come from: files under a local path, folder, glob or `s3://` prefix (or a
Hugging Face dataset's files), in JSONL (optionally compressed), JSON arrays, Parquet, Arrow or
plain text, read as one stream of raw records, each with its file and line (JSONL, text) or
1-based row (JSON array, Parquet).

The same readers (`readers.file_records`) run inside Ray Data read tasks (`read_corpus`) and
in plain Python (`ft-ray validate`, the format peek), so both see the records the same way.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import functools
import json
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Iterator

import pyarrow.fs as pafs

from ft_ray.config import OBJECTIVE_FORMATS, InputError, JobConfig, SourceConfig, StorageConfig
from ft_ray.data.formats import RecordError, detect_format, map_fields, uses_tools
from ft_ray.data.records import example_key
from ft_ray.data.readers import (COMPRESSIONS, DELIMITERS, KINDS, READ_CHUNK, ReadLimits, Unit, delimited_ranges,
                                 file_kind, file_records, fs_path, open_file)
from ft_ray.storage import filesystem_for

PEEK_RECORDS = 20  # records of a source's first file that `auto` looks at


class DataError(InputError):
    """The corpus cannot feed a run (no files, too many bad records, nothing left to train on)."""


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


def choose_format(source: SourceConfig, storage: StorageConfig, key: str) -> tuple[str, str]:
    """The format of a source and a sentence saying how it was chosen.

    `auto` looks at the first records of the source's first file and takes the most common
    format among them; records of another shape are then rejected with the reason.
    """
    if source.format and source.format != "auto":
        return source.format, f"{key}: format {source.format} (from the config)"
    fs, files = list_files(source, storage, key)
    seen: Counter = Counter()
    tools = read = 0  # chat records with function calls; records read
    first_problem, looked_at = "", []
    for path in files:  # the first records, from as many files as hold them (an empty file votes for none)
        looked_at.append(path)
        with open_file(fs, path) as stream:
            for line, text, error in file_records(stream, path):
                if read >= PEEK_RECORDS:
                    break
                read += 1
                if error:
                    first_problem = first_problem or f"{path}:{line}: {error}"
                    continue
                try:
                    record = map_fields(json.loads(text), source.fields)
                    seen[detect_format(record)] += 1
                    tools += uses_tools(record)
                except (json.JSONDecodeError, RecordError, RecursionError) as e:  # a bad record is not a format vote
                    first_problem = first_problem or f"{path}:{line}: {e}"
        if read >= PEEK_RECORDS:
            break
    where = looked_at[0] if len(looked_at) == 1 else f"{len(looked_at)} files from {looked_at[0]}"
    if not read:
        raise DataError(f"{key}: no records in {where}")
    if not seen:
        raise DataError(f"{key}: format auto: none of the first {read} records of {where} looks like text, "
                        "instruction, chat, completion, preference or kto (first: "
                        f"{first_problem}); set data.format and data.fields")
    chosen, count = seen.most_common(1)[0]
    with_tools = f", {tools} with tool calls or schemas" if chosen == "chat" and tools else ""
    return chosen, (f"{key}: format auto -> {chosen} ({count} of the first {sum(seen.values())} "
                    f"records of {where}{with_tools})")


def check_format(config: JobConfig, fmt: str, key: str) -> None:
    """Raises DataError when a source's records are not what the job's objective trains on."""
    allowed = OBJECTIVE_FORMATS[config.objective]
    if fmt not in allowed:
        names = [o for o, formats in OBJECTIVE_FORMATS.items() if fmt in formats]
        objectives = " or ".join(names) if len(names) < 3 else f"{', '.join(names[:-1])} or {names[-1]}"
        raise DataError(f"{key}: records of format {fmt} train with objective {objectives}, not "
                        f"{config.objective} (which needs format {' or '.join(allowed)}); set objective "
                        "in the job file")


RANGE_MIN_BYTES = 4 << 20
RANGE_MAX_BYTES = 64 << 20


def read_units(fs: pafs.FileSystem, files: list[str], cpus: int, in_ray: bool = True,
               limits: ReadLimits = ReadLimits()) -> list[Unit]:
    """The files as read tasks: large uncompressed files of one record per line (JSONL,
    text read by line) in byte ranges, enough for about two tasks per CPU (4-64 MB each),
    so one large file is read and tokenized by many tasks. A range's first line number
    comes from newline counts of the ranges before it, counted by Ray tasks (the driver
    never reads the corpus) or, without `in_ray`, here. A large uncompressed CSV/TSV file's
    ranges start at rows, found by one task that parses it (`readers.delimited_ranges`);
    the parsing and tokenizing of its ranges then spread like JSONL's. Parquet: runs of row groups."""
    sizes = [info.size or 0 for info in fs.get_file_info([fs_path(f) for f in files])]
    span = read_span(sum(sizes), cpus)
    units: list[Unit | tuple[str, int]] = []  # (path, size): a CSV/TSV file its rows are to split
    for path, size in zip(files, sizes):
        if file_kind(path) == "parquet" and size > span:
            units += row_group_units(fs, path, size, span)
            continue
        whole = path.lower().endswith(COMPRESSIONS) or size <= span
        if file_kind(path) in DELIMITERS and not whole:
            units.append((path, size))
            continue
        if not limits.one_line_each(path) or whole:
            units.append(Unit(path, size))
            continue
        bounds = list(range(0, size, span)) + [size]
        units += [Unit(path, size, start, end) for start, end in zip(bounds, bounds[1:])]
    ranged = [i for i, unit in enumerate(units) if isinstance(unit, Unit) and unit.end is not None]  # JSONL
    delimited = [i for i, unit in enumerate(units) if not isinstance(unit, Unit)]
    scan_args = [(fs, *units[i], span, limits.max_record_bytes) for i in delimited]
    if (ranged or delimited) and in_ray:
        import ray

        count = ray.remote(num_cpus=1)(_count_newlines)  # fractions start new worker processes
        scan = ray.remote(num_cpus=1)(_delimited_ranges)
        counting, scanning = [count.remote(fs, units[i]) for i in ranged], [scan.remote(*a) for a in scan_args]
        counts, scanned = ray.get(counting), ray.get(scanning)
    else:
        counts = [_count_newlines(fs, units[i]) for i in ranged]
        scanned = [_delimited_ranges(*args) for args in scan_args]
    before: dict[str, int] = {}
    for i, newlines in zip(ranged, counts):
        units[i] = dataclasses.replace(units[i], lines_before=before.get(units[i].path, 0))
        before[units[i].path] = units[i].lines_before + newlines
    pieces = dict(zip(delimited, scanned))
    return [unit for i, one in enumerate(units) for unit in (pieces[i] if i in pieces else [one])]


def _delimited_ranges(fs: pafs.FileSystem, path: str, size: int, span: int, max_bytes: int) -> list[Unit]:
    with fs.open_input_stream(fs_path(path)) as stream:
        return delimited_ranges(stream, path, size, span, max_bytes)


def row_group_units(fs: pafs.FileSystem, path: str, size: int, span: int) -> list[Unit]:
    """A large Parquet file as runs of consecutive row groups of about `span` compressed bytes
    each (read from its footer alone), so many tasks read and tokenize it; one unit when it
    has a single row group."""
    import pyarrow.parquet as pq

    with fs.open_input_file(fs_path(path)) as f:
        meta = pq.ParquetFile(f).metadata
    units, first, rows_before, rows, group_bytes = [], 0, 0, 0, 0
    for i in range(meta.num_row_groups):
        group = meta.row_group(i)
        rows += group.num_rows
        group_bytes += sum(group.column(c).total_compressed_size for c in range(group.num_columns))
        if group_bytes >= span or i == meta.num_row_groups - 1:
            units.append(Unit(path, size, lines_before=rows_before, row_groups=(first, i + 1), group_bytes=group_bytes))
            first, rows_before, rows, group_bytes = i + 1, rows_before + rows, 0, 0
    return units if len(units) > 1 else [Unit(path, size)]


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
            stream.seek(unit.start if unit.header is not None else max(0, unit.start - 1))  # a CSV row's first byte
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


def eval_examples(config: JobConfig) -> Counter:
    """How often each example (`records.example_key`) is in `data.eval`, read in plain Python
    (held-out sets are small)."""
    source = config.data.eval_source()
    return Counter(example_key(text, source.fields) for _, _, text, _ in
                   read_records(source, config.storage, "data.eval", ReadLimits.of(config.data, source)))


def read_records(source: SourceConfig | str, storage: StorageConfig, key: str,
                 limits: ReadLimits = ReadLimits()) -> Iterator[tuple[str, int, str, str]]:
    """(file, line or row, record text, error) of every record, in plain Python (no Ray)."""
    fs, files = list_files(source, storage, key)
    for path in files:
        with open_file(fs, path, limits) as stream:
            for line, text, error in file_records(stream, path, limits=limits):
                yield path, line, text, error


def usable_records(source: SourceConfig, storage: StorageConfig, key: str, limits: ReadLimits = ReadLimits(),
                   keep: Callable[[str], bool] | None = None) -> Iterator[dict]:
    """The records of a source the pipeline would not reject for their shape (parsed, fields
    mapped, in a training format), in file order, read one by one; `keep(text)` picks among
    them (e.g. the eval split)."""
    for _, _, text, error in read_records(source, storage, key, limits):
        if error or (keep is not None and not keep(text)):
            continue
        try:
            record = map_fields(json.loads(text), source.fields)
            detect_format(record)
        except (json.JSONDecodeError, RecordError, RecursionError):
            continue
        yield record
