"""The Ray Data pipeline: read the sources → parse and tokenize (per record, bad ones set
aside) → split train/eval → shuffle → pack → datasets the Train workers stream from.

Nothing here pulls the corpus into the driver: records move between Ray tasks as blocks
in the object store (spilled to disk when large), and the driver only sees counts.
"""

from __future__ import annotations

import functools
import json
import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ft_ray import progress
from ft_ray.config import JobConfig, ModelConfig, SourceConfig, StorageConfig
from ft_ray.console import LOG
from ft_ray.data.records import encode_records, eval_bucket, printable, sample_id, source_name, weighted_copies
from ft_ray.data.readers import ReadLimits, file_kind
from ft_ray.data.sources import DataError, check_format, choose_format, common_folder, list_files, read_corpus
from ft_ray.data.tokenize import pack_arrays

TOKENIZE_BATCH = 256
PACK_BATCH = 1024
__all__ = ["DataError", "DataStats", "build_datasets"]


@dataclass
class DataStats:
    records_read: int = 0
    records_rejected: int = 0
    rejected_by_reason: dict[str, int] = field(default_factory=dict)
    train_examples: int = 0
    eval_examples: int = 0
    train_sequences: int = 0
    eval_sequences: int = 0
    train_tokens: int = 0
    packing_efficiency: float = 0.0
    formats: dict[str, str] = field(default_factory=dict)
    records_truncated: int = 0  # records longer than model.max_seq_len, cut at the end
    tokens_dropped: int = 0  # the tokens those cuts dropped
    tokens_dropped_fraction: float = 0.0  # of all the tokens of the records read
    records_windowed: int = 0  # long texts cut into windows that all train
    eval_sets: dict[str, dict[str, int]] = field(default_factory=dict)  # data.eval_sets: examples, sequences by name


EVAL_SET = "eval.{}"  # the dataset of a data.eval_sets set


def task_model_json(model: ModelConfig) -> str:
    """The model section for Ray tasks (`task_model`), with the storage an s3:// model is read from."""
    return json.dumps({"model": model.model_dump(mode="json"), "storage": model.storage.model_dump(mode="json")})


@functools.lru_cache(maxsize=4)
def task_model(model_json: str) -> ModelConfig:
    """The model section `task_model_json` wrote."""
    sections = json.loads(model_json)
    model = ModelConfig.model_validate(sections["model"])
    model.use_storage(StorageConfig.model_validate(sections["storage"]))
    return model


@functools.lru_cache(maxsize=4)
def task_tokenizer(model_json: str) -> Any:
    """The model's tokenizer in a Ray task, loaded once per worker process (tasks reuse them)."""
    from ft_ray.models import load_tokenizer

    return load_tokenizer(task_model(model_json))


# per row: a record's example (or one window of a long text), and where it comes from; `dropped`:
# the tokens truncation cut off the record
COLUMNS = ("input_ids", "labels", "reason", "detail", "is_eval", "path", "line", "text", "copy", "window", "dropped",
           "sample_id")


@functools.lru_cache(maxsize=2)
def _schema(roles: bool = False) -> Any:
    """Fixed column types: ids as variable-length lists in every block (numpy would make
    a batch of equal-length records a fixed-shape tensor that later blocks cannot join).
    Preference data has a `roles` list beside the ids."""
    import pyarrow as pa

    ids = pa.list_(pa.int32())
    return pa.schema([("input_ids", ids), ("labels", ids), ("reason", pa.string()), ("detail", pa.string()),
                      ("is_eval", pa.bool_()), ("path", pa.string()), ("line", pa.int64()), ("text", pa.string()),
                      ("copy", pa.int64()), ("window", pa.int32()), ("dropped", pa.int64()), ("sample_id", pa.int64())]
                     + ([("roles", ids)] if roles else []))


def parse_and_tokenize(batch: dict[str, np.ndarray], *, model_json: str, fmt: str, eval_fraction: float,
                       fields: dict[str, str] | None = None, weight: float = 1.0,
                       drop_over: int | None = None, progress: Any = None, source: tuple[str, str] = ("", ""),
                       roles: bool = False, text_stride: int | None = None, loss_on: str = "answers") -> Any:
    """Rows of ids and labels (one per copy of a weighted record), or one row with the
    reason a record was rejected, as an Arrow table. `copy` is -1 for a record its weight
    leaves out.

    The batch (a whole read block: the read and this step run in one task) goes through the
    tokenizer `TOKENIZE_BATCH` records at a time: measured on this corpus, 4096 records per
    call ran at 0.65x the speed of 256 (the ids of a large call fall out of the CPU caches).
    Errors are caught per record, so one bad line never takes its neighbours with it.
    `progress` (the driver's `progress.board()`) is told how many records were read.
    `source` (its key, its files' common folder) names the files in the sample ids.
    `roles`: a preference objective's run, whose rows carry each token's role.
    `text_stride`: long `text` records are cut into windows with this overlap (None: truncated).
    `loss_on`: which text of a supervised example trains (`data.loss_on`).
    """
    import pyarrow as pa

    tokenizer = task_tokenizer(model_json)
    max_len = task_model(model_json).max_seq_len
    count = len(batch["text"])
    errors = batch["error"] if "error" in batch else [""] * count
    lines = batch["line"] if "line" in batch else range(1, count + 1)
    tables = []
    for start in range(0, count, TOKENIZE_BATCH):
        part = slice(start, start + TOKENIZE_BATCH)
        rows = _tokenized_rows(batch["text"][part], errors[part], batch["path"][part], lines[part], tokenizer,
                               max_len, fmt, fields or {}, eval_fraction, weight, drop_over, source, roles,
                               text_stride, loss_on)
        tables.append(pa.table(rows, schema=_schema(roles)))
    if progress is not None:
        progress.add.remote("records", count)
    return pa.concat_tables(tables) if tables else _schema(roles).empty_table()


def _tokenized_rows(texts: Any, errors: Any, paths: Any, lines: Any, tokenizer: Any, max_len: int, fmt: str,
                    fields: dict[str, str], eval_fraction: float, weight: float,
                    drop_over: int | None, source: tuple[str, str], roles: bool,
                    text_stride: int | None, loss_on: str) -> dict[str, Any]:
    batch = encode_records(texts, errors, fmt, fields, tokenizer, max_len, drop_over, text_stride, loss_on)
    rows: dict[str, list] = {k: [] for k in COLUMNS[2:]}
    example = []  # the example of each row
    examples = np.split(np.arange(len(batch.offsets) - 1), np.flatnonzero(np.diff(batch.records())) + 1)
    for windows, text, error, path, line, dropped in zip(examples, texts, batch.errors, paths, lines, batch.dropped):
        reason, detail = (error.kind, printable(str(error))) if error is not None else ("", "")
        is_eval = eval_bucket(text) < eval_fraction
        copies = 1 if reason or is_eval else weighted_copies(weight, text)
        for copy in range(copies) if copies else [-1]:
            for window, i in enumerate(windows):
                example.append(i)
                values = (reason, detail, is_eval, path, int(line), text if reason else "", copy, window,
                          int(dropped), sample_id(source_name(path, source[1], source[0]), int(line), copy, window))
                for column, value in zip(COLUMNS[2:], values):
                    rows[column].append(value)
    rows["input_ids"] = _int32_lists(batch.ids, batch.offsets, example)
    rows["labels"] = _int32_lists(batch.labels, batch.offsets, example)
    if roles:
        token_roles = batch.roles if batch.roles is not None else np.zeros_like(batch.ids)
        rows["roles"] = _int32_lists(token_roles, batch.offsets, example)
    return rows


def _int32_lists(flat: np.ndarray, offsets: np.ndarray, rows: list[int]) -> Any:
    """An Arrow list<int32> column of the examples `rows` (a copied example twice) of flat
    arrays (Arrow's conversion of a list of Python lists costs a third of the tokenizer's time)."""
    import pyarrow as pa

    rows = np.asarray(rows, dtype=np.int64)
    lengths = np.diff(offsets)[rows]
    out = np.zeros(len(rows) + 1, dtype=np.int32)
    np.cumsum(lengths, out=out[1:])
    take = np.repeat(offsets[:-1][rows] - out[:-1], lengths) + np.arange(out[-1])
    return pa.ListArray.from_arrays(pa.array(out), pa.array(flat[take], type=pa.int32()))


def pack_batch(batch: Any, *, max_len: int, pad_id: int, pack: bool) -> dict[str, np.ndarray]:
    """Packed (or padded) sequences of a batch of tokenized rows (an Arrow table)."""
    ids, labels = batch["input_ids"].combine_chunks(), batch["labels"].combine_chunks()
    roles = batch["roles"].combine_chunks().flatten().to_numpy() if "roles" in batch.column_names else None
    return pack_arrays(ids.flatten().to_numpy(), labels.flatten().to_numpy(), ids.offsets.to_numpy(),
                       batch["sample_id"].to_numpy(), max_len, pad_id, pack, roles)


def read_source(config: JobConfig, source: SourceConfig, key: str, eval_fraction: float,
                stats: DataStats) -> Any:
    """One source's records, parsed and tokenized by Ray tasks (rows as `parse_and_tokenize`)."""
    fs, files = list_files(source, config.storage, key)
    fmt, note = choose_format(source, config.storage, key)
    check_format(config, fmt, key)
    stats.formats[key] = fmt
    texts = sum(file_kind(f) == "text" for f in files)
    unit = f", {texts} of plain text read by {config.data.text_unit} (data.text_unit)" if texts else ""
    LOG.info(f"data: {note}; {len(files)} file(s){unit}")
    return read_corpus(fs, files, limits=ReadLimits.of(config.data, source)).map_batches(
        parse_and_tokenize, batch_size=None,
        fn_kwargs={"model_json": task_model_json(config.model), "fmt": fmt, "eval_fraction": eval_fraction,
                   "fields": source.fields, "weight": source.weight, "drop_over": config.drop_over,
                   "progress": progress.board(), "source": (key, common_folder(files)),
                   "roles": config.carries_roles, "text_stride": config.data.text_stride,
                   "loss_on": config.data.loss_on})


def build_datasets(config: JobConfig, tokenizer: Any, rejected_dir: str | None,
                   rejected_fs: Any = None) -> tuple[dict[str, Any], DataStats]:
    """Train and eval datasets of packed sequences, materialized in the object store.

    Rejected records are written to `rejected_dir` (JSONL: file, line, reason, detail, the
    raw record) before the rejection threshold is checked, so a failed run still shows what
    was wrong.

    Raises:
        DataError: too many rejected records, or no train/eval example left.
    """
    import ray
    import ray.data

    ray.data.DataContext.get_current().execution_options.preserve_order = True  # same order every run
    start_at_full_width()
    data, stats = config.data, DataStats()
    split_off = 0.0 if data.eval else data.eval_fraction
    sources = len(data.keyed_sources()) + bool(data.eval) + len(data.eval_sets)
    LOG.info(f"data: reading + tokenizing {sources} source(s) on "
             f"{ray.cluster_resources().get('CPU', 0):.0f} CPUs, {'packing' if data.pack else 'padding'} to "
             f"{config.model.max_seq_len} tokens")
    with progress.watching("read + tokenize", None, "records", lambda counts, _: (counts.get("records", 0), "")):
        parts = [read_source(config, source, key, split_off, stats) for key, source in data.keyed_sources()]
        tokenized = (parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]).materialize()
        held_out = (read_source(config, data.eval_source(), "data.eval", 1.0, stats).materialize()
                    if data.eval else None)
        others = {name: read_source(config, source, key, 1.0, stats).materialize()
                  for name, key, source in data.eval_set_sources()}
    blocks = tokenized.to_arrow_refs() + (held_out.to_arrow_refs() if held_out else [])
    eval_rows = count_records(stats, blocks)
    other_rows = {name: count_eval_set(stats, name, dataset.to_arrow_refs()) for name, dataset in others.items()}
    if stats.records_rejected and rejected_dir:
        held = [d for d in [held_out, *others.values()] if d is not None]
        lines = tokenized.union(*held) if held else tokenized
        write_rejected(rows_of(lines, "rejected"), rejected_dir, rejected_fs)
    check_counts(config, stats)
    warn_if_truncated(config, stats)
    seed = config.shuffle_seed
    pack_args = {"max_len": config.model.max_seq_len, "pad_id": tokenizer.pad_token_id, "pack": data.pack}
    eval_refs = pack_tasks(blocks, eval_rows, pack_args)  # runs while the train order is made
    other_refs = {name: pack_tasks(others[name].to_arrow_refs(), rows, pack_args) for name, rows in other_rows.items()}
    if stats.train_tokens <= SMALL_SHUFFLE_TOKENS:
        train_packed = ray.data.from_arrow_refs(pack_tasks(blocks, train_order(blocks, seed), pack_args))
    else:
        train_rows = functools.partial(_kept, which="train", columns=list(PACKED_FROM))
        train_packed = (shuffle(tokenized, seed, stats.train_tokens, train_rows)
                        .map_batches(pack_batch, batch_size=PACK_BATCH, batch_format="pyarrow", fn_kwargs=pack_args)
                        .materialize())
    eval_packed = ray.data.from_arrow_refs(eval_refs)
    datasets = {"train": train_packed, "eval": eval_packed}
    for name, refs in other_refs.items():
        datasets[EVAL_SET.format(name)] = ray.data.from_arrow_refs(refs)
        stats.eval_sets[name]["sequences"] = datasets[EVAL_SET.format(name)].count()
    stats.train_sequences, stats.eval_sequences = train_packed.count(), eval_packed.count()
    stats.packing_efficiency = round(stats.train_tokens / max(1, stats.train_sequences * config.model.max_seq_len), 4)
    return datasets, stats


def start_at_full_width() -> None:
    """Ray Data (2.60) learns the cluster's CPUs from its autoscaling coordinator actor,
    whose first answer comes after the executor's first look, and the executor keeps that
    look for a second: every execution ran ONE task through its first second (measured on
    2 CPUs: the second read task started 1.05 s after the first). Looking every 50 ms, the
    second task starts within 0.15 s. A private setting: left alone if Ray renames it."""
    try:
        from ray.data._internal.execution.resource_manager import ResourceManager
    except ImportError:
        return
    if getattr(ResourceManager, "GLOBAL_LIMITS_UPDATE_INTERVAL_S", 0) > 0.05:
        ResourceManager.GLOBAL_LIMITS_UPDATE_INTERVAL_S = 0.05


PACKED_FROM = ("input_ids", "labels", "sample_id", "roles")  # the columns packing reads (roles: when there)


def train_order(blocks: list, seed: int) -> np.ndarray:
    """(block, row) of every train example of `blocks`, in the seeded order: each block's
    train rows and their shuffle keys come from a plain Ray task, and the driver sorts the
    keys (16 bytes per example: this path is for sets of up to `SMALL_SHUFFLE_TOKENS`)."""
    plans = per_block(blocks, _train_keys, seed)
    keys = np.concatenate([keys for _, keys in plans] + [np.zeros(0, dtype=np.int64)])
    return block_rows([rows for rows, _ in plans])[:, np.argsort(keys, kind="stable")]


def block_rows(rows_by_block: list[np.ndarray]) -> np.ndarray:
    """(block, row) pairs, shape (2, n), of each block's row numbers, in block order."""
    return np.concatenate([np.stack([np.full(len(rows), i), rows]) for i, rows in enumerate(rows_by_block)]
                          + [np.zeros((2, 0), dtype=np.int64)], axis=1)


def _train_keys(block: Any, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The rows of a block's train examples and their shuffle keys."""
    if not block.num_rows:  # a read task with no record leaves no columns
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    rows = np.flatnonzero(_selected(block, "train").to_numpy(zero_copy_only=False))
    return rows, shuffle_keys(block["sample_id"].to_numpy()[rows], seed)


def pack_tasks(blocks: list, where: np.ndarray, pack_args: dict[str, Any]) -> list:
    """Refs to the packed sequences of the rows `where` ((block, row) pairs, in that order),
    in blocks made by plain Ray tasks, which take their rows from the tokenized blocks
    (shared memory on a node) and pack them `PACK_BATCH` at a time: the packing batches,
    and so the sequences, follow from the order alone, whatever the tasks. The tasks come
    in rounds of one per CPU, each of at most `MAX_PACK_TASK_BATCHES` batches (measured on
    2 CPUs, 40k examples: tasks of 1, 2, 4, 8 batches took 2.4, 1.5, 1.3, 1.2 s in all: a
    task costs about 0.1 s of its own; 5 tasks of 8 left a CPU idle through the last). A
    Ray Data run here cost about 1 s for 0.3 s of packing."""
    import ray

    cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
    batches = math.ceil(where.shape[1] / PACK_BATCH)  # at least one: check_counts stops a run with no example
    tasks = cpus * math.ceil(batches / (cpus * MAX_PACK_TASK_BATCHES))
    rows_per_task = PACK_BATCH * math.ceil(batches / tasks)
    task = ray.remote(_packed_block)
    packed = []
    for start in range(0, where.shape[1], rows_per_task):
        part = where[:, start:start + rows_per_task]
        used, local = np.unique(part[0], return_inverse=True)
        packed.append(task.remote(local, part[1], pack_args, *[blocks[i] for i in used]))
    return packed


def _packed_block(local: np.ndarray, rows: np.ndarray, pack_args: dict[str, Any], *blocks: Any) -> Any:
    import pyarrow as pa
    from ray.data.block import BlockAccessor

    sizes = np.array([0] + [block.num_rows for block in blocks], dtype=np.int64)
    table = pa.concat_tables([block.select(_present(block, PACKED_FROM)) for block in blocks])
    table = table.take(np.cumsum(sizes)[local] + rows)  # one take across the blocks, in the rows' order
    batches = [pack_batch(table.slice(at, PACK_BATCH), **pack_args) for at in range(0, len(rows), PACK_BATCH)]
    return BlockAccessor.batch_to_block({k: np.concatenate([b[k] for b in batches]) for k in batches[0]})


def shuffle_keys(sample_ids: np.ndarray, seed: int) -> np.ndarray:
    """A seeded pseudo-random key per sample id (splitmix64), as int64."""
    with np.errstate(over="ignore"):
        key = sample_ids.astype(np.uint64) ^ np.uint64((seed * 0x9E3779B97F4A7C15) % 2 ** 64)
        key = (key ^ (key >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        key = (key ^ (key >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        key ^= key >> np.uint64(31)
    return key.view(np.int64)


def _with_shuffle_key(batch: Any, seed: int) -> Any:
    import pyarrow as pa

    return batch.append_column("shuffle_key", pa.array(shuffle_keys(batch["sample_id"].to_numpy(), seed)))


SMALL_SHUFFLE_TOKENS = 32_000_000  # up to this many train tokens (about 100k examples), the driver sorts
SHUFFLE_PARTITION_TOKENS = 32_000_000  # tokens per hash-shuffle partition above that
MAX_PACK_TASK_BATCHES = 32


def shuffle(dataset: Any, seed: int, tokens: int, keep: Any = None) -> Any:
    """The rows in a seeded random order, the same every run, for sets of more than
    `SMALL_SHUFFLE_TOKENS` tokens (smaller ones: `train_order`): hash-partitioned on a
    random key by Ray Data's hash shuffle, then sorted on that key inside each partition.

    `keep`: the rows and columns of a block to shuffle (run in the shuffle's own tasks).

    Ray's `random_shuffle` was measured to hold the shuffled data in the driver (its map
    outputs are small objects, returned inline to the driver that owns them): driver memory
    grew with the corpus. Here aggregator actors own the data and the driver stays flat.
    """
    from ray.data.context import DataContext, ShuffleStrategy

    if keep is not None:
        dataset = dataset.map_batches(keep, batch_format="pyarrow", batch_size=None)
    keyed = dataset.map_batches(_with_shuffle_key, batch_format="pyarrow", batch_size=None, fn_kwargs={"seed": seed})
    DataContext.get_current().shuffle_strategy = ShuffleStrategy.HASH_SHUFFLE
    # partitions from the data's size alone: the order must not depend on how many blocks the
    # read made (Ray sizes those by the cluster's CPUs), or a resume on another cluster would
    # see other samples
    partitions = max(2, math.ceil(tokens / SHUFFLE_PARTITION_TOKENS))
    partitioned = (keyed.repartition(partitions, keys=["shuffle_key"])
                   .map_batches(_sorted_by_key, batch_format="pyarrow", batch_size=None)
                   .materialize())
    return _blocks_in_key_order(partitioned).drop_columns(["shuffle_key"])


def _sorted_by_key(batch: Any) -> Any:
    return batch.sort_by("shuffle_key")


def _blocks_in_key_order(dataset: Any) -> Any:
    """The dataset's blocks ordered by their first key. The hash shuffle's partitions come
    out in the order they finish (which varies run to run); what each holds does not."""
    import ray
    import ray.data

    @ray.remote(num_cpus=0.1)
    def first_key(block: Any) -> int:
        return block["shuffle_key"][0].as_py() if block.num_rows else 2 ** 63

    refs = dataset.to_arrow_refs()
    firsts = ray.get([first_key.remote(ref) for ref in refs])
    order = sorted(range(len(refs)), key=lambda i: firsts[i])
    return ray.data.from_arrow_refs([refs[i] for i in order])


def _selected(batch: Any, which: str) -> Any:
    """The mask of a block's train examples, eval examples or rejected records."""
    import pyarrow.compute as pc

    good = pc.equal(batch["reason"], "")
    if which == "rejected":
        return pc.invert(good)
    if which == "eval":
        return pc.and_(good, batch["is_eval"])
    return pc.and_(pc.and_(good, pc.invert(batch["is_eval"])), pc.greater_equal(batch["copy"], 0))


def _select(batch: Any, which: str) -> Any:
    return batch.filter(_selected(batch, which))


def _kept(batch: Any, which: str, columns: list[str]) -> Any:
    return _select(batch, which).select(_present(batch, columns))


def _present(block: Any, columns: Any) -> list[str]:
    return [c for c in columns if c in block.column_names]


def rows_of(dataset: Any, which: str) -> Any:
    """The train examples, eval examples or rejected records of a tokenized dataset
    (vectorized per block: a Python predicate per row costs more than the tokenizer)."""
    return dataset.map_batches(_select, batch_format="pyarrow", batch_size=None, fn_kwargs={"which": which})


def _block_counts(batch: Any) -> dict[str, Any]:
    import pyarrow.compute as pc

    if not batch.num_rows:  # a read task with no record (a byte range inside one long line) leaves no columns
        return {"read": 0, "reasons": {}, "train": 0, "train_tokens": 0, "eval_rows": np.zeros(0, dtype=np.int64),
                "truncated": 0, "dropped": 0, "tokens": 0, "windowed": 0}

    def total(values: Any, where: Any) -> int:
        return pc.sum(pc.filter(values, where)).as_py() or 0

    first_copy = pc.less(batch["copy"], 1)  # a record's first copy, or the one row of a left-out record
    first = pc.and_(first_copy, pc.equal(batch["window"], 0))  # one row per record read
    train = _selected(batch, "train")  # a mask: filtering the block would copy every example's ids and labels
    lengths = pc.list_value_length(batch["input_ids"])
    return {"read": pc.sum(first.cast("int64")).as_py() or 0,
            "reasons": Counter(r for r in batch["reason"].to_pylist() if r),
            "train": pc.sum(train.cast("int64")).as_py() or 0,
            "train_tokens": total(lengths, train),
            "eval_rows": np.flatnonzero(_selected(batch, "eval").to_numpy(zero_copy_only=False)),
            "truncated": total(pc.greater(batch["dropped"], 0).cast("int64"), first),
            "dropped": total(batch["dropped"], first), "tokens": total(lengths, first_copy),
            "windowed": total(pc.equal(batch["window"], 1).cast("int64"), first_copy)}


def count_records(stats: DataStats, blocks: list) -> np.ndarray:
    """Records read, train/eval examples and rejects by reason, from small per-block counts
    by plain Ray tasks (Ray Data's count/groupby aggregations each shuffle: seconds apiece).

    Returns:
        (block, row) of every eval example, in block order.
    """
    reasons: Counter = Counter()
    eval_rows = []
    tokens = 0  # of the records read, as kept
    for counts in per_block(blocks, _block_counts):
        stats.records_read += int(counts["read"])
        stats.train_examples += int(counts["train"])
        stats.train_tokens += int(counts["train_tokens"])  # packing keeps every token
        stats.eval_examples += len(counts["eval_rows"])
        stats.records_truncated += int(counts["truncated"])
        stats.tokens_dropped += int(counts["dropped"])
        stats.records_windowed += int(counts["windowed"])
        tokens += int(counts["tokens"])
        reasons.update(counts["reasons"])
        eval_rows.append(counts["eval_rows"])
    stats.rejected_by_reason = dict(reasons)
    stats.records_rejected = sum(reasons.values())
    stats.tokens_dropped_fraction = round(stats.tokens_dropped / max(1, tokens + stats.tokens_dropped), 4)
    return block_rows(eval_rows)


def count_eval_set(stats: DataStats, name: str, blocks: list) -> np.ndarray:
    """`count_records` of a data.eval_sets set (all held out): its examples go to
    `stats.eval_sets`, its records read and rejected to the job's counts.

    Raises:
        DataError: the set has no usable example.
    """
    own = DataStats()
    rows = count_records(own, blocks)
    stats.records_read += own.records_read
    stats.rejected_by_reason = dict(Counter(stats.rejected_by_reason) + Counter(own.rejected_by_reason))
    stats.records_rejected += own.records_rejected
    if not own.eval_examples:
        raise DataError(f"data.eval_sets.{name}: no usable example ({own.records_read} records read, "
                        f"{own.records_rejected} rejected; see the rejected/ folder)")
    stats.eval_sets[name] = {"examples": own.eval_examples, "sequences": 0}
    return rows


def per_block(blocks: list, fn: Any, *args: Any) -> list:
    """`fn(block, *args)` of each block (Arrow table refs, as `Dataset.to_arrow_refs` gives
    them), by plain Ray tasks (a Ray Data run of a small map costs about half a second in
    scheduling alone)."""
    import ray

    task = ray.remote(fn)  # a whole CPU: a fraction starts worker processes of its own
    return ray.get([task.remote(block, *args) for block in blocks])


def sum_column(dataset: Any, column: str) -> int:
    """The sum of an integer column, block by block (no shuffle)."""
    return int(sum(per_block(dataset.select_columns([column]).to_arrow_refs(), _column_sum)))


def _column_sum(block: Any) -> int:
    import pyarrow.compute as pc

    return (pc.sum(block.column(0)).as_py() or 0) if block.num_rows else 0


def check_counts(config: JobConfig, stats: DataStats) -> None:
    """Raises DataError when too many records were rejected or a split is empty."""
    fraction = stats.records_rejected / max(1, stats.records_read)
    if fraction > config.data.max_rejected_fraction:
        worst = max(stats.rejected_by_reason.items(), key=lambda kv: kv[1])
        raise DataError(f"{stats.records_rejected} of {stats.records_read} records rejected ({fraction:.1%}), "
                        f"more than data.max_rejected_fraction={config.data.max_rejected_fraction}; "
                        f"most common reason: {worst[0]} ({worst[1]}x); see the rejected/ folder")
    if stats.train_examples == 0:
        raise DataError("data: no usable training example in "
                        + ", ".join(s.where for s in config.data.all_sources()))
    if stats.eval_examples == 0:
        raise DataError("no eval example: set data.eval to a file or raise data.eval_fraction")


TRUNCATION_WARNING = 0.01  # of the tokens read


def warn_if_truncated(config: JobConfig, stats: DataStats) -> None:
    """A warning when truncation dropped more than `TRUNCATION_WARNING` of the tokens read."""
    if stats.tokens_dropped_fraction > TRUNCATION_WARNING:
        LOG.warning(f"data: {stats.records_truncated} records are longer than model.max_seq_len="
                    f"{config.model.max_seq_len} and were cut at the end: {stats.tokens_dropped} tokens "
                    f"({stats.tokens_dropped_fraction:.1%} of those read) are never trained on; raise "
                    "model.max_seq_len, or set data.overlong: drop to leave such records out")


def write_rejected(rejected, folder: str, filesystem: Any = None) -> None:
    """Rejected records with their file, line and reason, as JSONL under `<run>/rejected/`
    (replacing what a relaunch of the run, or a killed earlier attempt, wrote there)."""
    from ray.data import SaveMode

    rejected.select_columns(["path", "line", "reason", "detail", "text"]).write_json(
        folder, filesystem=filesystem, mode=SaveMode.OVERWRITE)


def stats_table(stats: DataStats) -> str:
    """The data preparation's outcome, one figure per line, for the console."""
    rows = [("records read", stats.records_read), ("records rejected", stats.records_rejected)]
    rows += [(f"  {reason}", n) for reason, n in sorted(stats.rejected_by_reason.items(), key=lambda kv: -kv[1])]
    rows += [("records truncated", f"{stats.records_truncated} ({stats.tokens_dropped} tokens dropped, "
                                   f"{stats.tokens_dropped_fraction:.1%})")]
    rows += [("long texts in windows", stats.records_windowed)] if stats.records_windowed else []
    rows += [("train examples", stats.train_examples), ("eval examples", stats.eval_examples),
             ("train tokens", stats.train_tokens), ("packed train sequences", stats.train_sequences),
             ("packed eval sequences", stats.eval_sequences)]
    rows += [(f"eval set {name}", f"examples {counts['examples']}, packed sequences {counts['sequences']}")
             for name, counts in stats.eval_sets.items()]
    rows += [("packing efficiency", f"{stats.packing_efficiency:.1%} non-padding tokens")]
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"[ft-ray]   {name:<{width}}  {value}" for name, value in rows)
