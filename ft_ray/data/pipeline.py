"""The Ray Data pipeline: read JSONL → parse and tokenize (per record, bad ones set aside)
→ split train/eval → shuffle → pack → datasets the Train workers stream from.

Nothing here pulls the corpus into the driver: records move between Ray tasks as blocks
in the object store, and the driver only sees counts.
"""

from __future__ import annotations

import functools
import glob
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ft_ray.config import InputError, JobConfig, ModelConfig
from ft_ray.data.formats import RecordError, detect_format, record_segments
from ft_ray.data.tokenize import pack_examples, pad_example, tokenize_segments

TOKENIZE_BATCH = 256
PACK_BATCH = 1024


class DataError(InputError):
    """The corpus cannot feed a run (no files, too many bad records, nothing left to train on)."""


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
    formats: dict[str, int] = field(default_factory=dict)


def list_files(pattern: str, key: str = "data.train") -> list[str]:
    """Files of a path, folder (its *.jsonl) or glob, sorted so the order is stable.

    Raises:
        DataError: nothing matches.
    """
    path = Path(pattern)
    if path.is_dir():
        files = sorted(str(p) for p in path.rglob("*.jsonl"))
    elif any(ch in pattern for ch in "*?["):
        files = sorted(glob.glob(pattern, recursive=True))
    else:
        files = [pattern] if path.is_file() else []
    if not files:
        raise DataError(f"{key}: no JSONL files at {pattern!r}")
    return files


def eval_bucket(line: str) -> float:
    """A stable number in [0, 1) per record text: the train/eval split needs no shuffle."""
    return int.from_bytes(hashlib.blake2b(line.encode("utf-8"), digest_size=8).digest(), "big") / 2 ** 64


@functools.lru_cache(maxsize=4)
def _tokenizer(model_json: str) -> Any:
    from ft_ray.models import load_tokenizer

    return load_tokenizer(ModelConfig.model_validate_json(model_json))


def parse_and_tokenize(batch: dict[str, np.ndarray], *, model_json: str, fmt: str,
                       eval_fraction: float) -> dict[str, np.ndarray]:
    """One output row per input line: ids and labels, or the reason the record was rejected.

    Errors are caught per record, so one bad line never takes its neighbours with it.
    """
    tokenizer = _tokenizer(model_json)
    max_len = ModelConfig.model_validate_json(model_json).max_seq_len
    rows: dict[str, list] = {k: [] for k in ("input_ids", "labels", "reason", "format", "is_eval", "path", "text")}
    for line, path in zip(batch["text"], batch["path"]):
        input_ids, labels, reason, detected = [], [], "", ""
        try:
            record = json.loads(line)
            detected = detect_format(record) if fmt == "auto" else fmt
            example = tokenize_segments(record_segments(record, detected, tokenizer), tokenizer, max_len)
            input_ids, labels = example["input_ids"], example["labels"]
        except json.JSONDecodeError as e:
            reason = f"not JSON: {e.msg}"
        except RecordError as e:
            reason = str(e)
        rows["input_ids"].append(np.asarray(input_ids, dtype=np.int32))
        rows["labels"].append(np.asarray(labels, dtype=np.int32))
        rows["reason"].append(reason)
        rows["format"].append(detected)
        rows["is_eval"].append(eval_bucket(line) < eval_fraction)
        rows["path"].append(path)
        rows["text"].append(line if reason else "")
    return {k: np.asarray(v, dtype=object) if k in ("input_ids", "labels") else np.asarray(v)
            for k, v in rows.items()}


def pack_batch(batch: dict[str, np.ndarray], *, max_len: int, pad_id: int, pack: bool) -> dict[str, np.ndarray]:
    examples = [{"input_ids": i, "labels": l} for i, l in zip(batch["input_ids"], batch["labels"])]
    sequences = (list(pack_examples(examples, max_len, pad_id)) if pack
                 else [pad_example(e, max_len, pad_id) for e in examples])
    return {k: np.stack([s[k] for s in sequences]) for k in sequences[0]}


def read_tokenized(config: JobConfig, source: str, key: str, eval_fraction: float):
    """Lines of the source files, parsed and tokenized by Ray tasks (one row per line)."""
    import ray.data

    lines = ray.data.read_text(list_files(source, key), include_paths=True, drop_empty_lines=True)
    return lines.map_batches(
        parse_and_tokenize, batch_size=TOKENIZE_BATCH,
        fn_kwargs={"model_json": config.model.model_dump_json(), "fmt": config.data.format,
                   "eval_fraction": eval_fraction})


def build_datasets(config: JobConfig, tokenizer: Any, rejected_dir: str | None,
                   rejected_fs: Any = None) -> tuple[dict[str, Any], DataStats]:
    """Train and eval datasets of packed sequences, materialized in the object store.

    Rejected records are written to `rejected_dir` (JSONL: file, reason, the raw line)
    before the rejection threshold is checked, so a failed run still shows what was wrong.

    Raises:
        DataError: too many rejected records, or no train/eval example left.
    """
    import ray.data

    ray.data.DataContext.get_current().execution_options.preserve_order = True  # same order every run
    data = config.data
    split_off = 0.0 if data.eval else data.eval_fraction
    tokenized = read_tokenized(config, data.train, "data.train", split_off).materialize()
    train = tokenized.filter(lambda row: row["reason"] == "" and not row["is_eval"])
    if data.eval:
        eval_tokenized = read_tokenized(config, data.eval, "data.eval", 1.0).materialize()
        lines = tokenized.union(eval_tokenized)
    else:
        eval_tokenized, lines = tokenized, tokenized
    evaluation = eval_tokenized.filter(lambda row: row["reason"] == "" and row["is_eval"])
    rejected = lines.filter(lambda row: row["reason"] != "")
    stats = _count(lines, train, evaluation, rejected)
    if stats.records_rejected and rejected_dir:
        write_rejected(rejected, rejected_dir, rejected_fs)
    check_counts(config, stats)
    seed = data.shuffle_seed if data.shuffle_seed is not None else config.train.seed
    pack_args = {"max_len": config.model.max_seq_len, "pad_id": tokenizer.pad_token_id, "pack": data.pack}
    columns = ["input_ids", "labels"]
    train_packed = (train.select_columns(columns).random_shuffle(seed=seed)
                    .map_batches(pack_batch, batch_size=PACK_BATCH, fn_kwargs=pack_args).materialize())
    eval_packed = (evaluation.select_columns(columns)
                   .map_batches(pack_batch, batch_size=PACK_BATCH, fn_kwargs=pack_args).materialize())
    stats.train_sequences, stats.eval_sequences = train_packed.count(), eval_packed.count()
    stats.train_tokens = int(train_packed.sum("num_tokens") or 0)
    stats.packing_efficiency = round(stats.train_tokens / max(1, stats.train_sequences * config.model.max_seq_len), 4)
    return {"train": train_packed, "eval": eval_packed}, stats


def _count(lines, train, evaluation, rejected) -> DataStats:
    stats = DataStats(records_read=lines.count(), train_examples=train.count(),
                      eval_examples=evaluation.count(), records_rejected=rejected.count())
    if stats.records_rejected:
        for row in rejected.groupby("reason").count().take_all():
            stats.rejected_by_reason[row["reason"]] = int(row["count()"])
    for row in lines.filter(lambda r: r["reason"] == "").groupby("format").count().take_all():
        stats.formats[row["format"]] = int(row["count()"])
    return stats


def check_counts(config: JobConfig, stats: DataStats) -> None:
    """Raises DataError when too many records were rejected or a split is empty."""
    fraction = stats.records_rejected / max(1, stats.records_read)
    if fraction > config.data.max_rejected_fraction:
        worst = max(stats.rejected_by_reason.items(), key=lambda kv: kv[1])
        raise DataError(f"{stats.records_rejected} of {stats.records_read} records rejected ({fraction:.1%}), "
                        f"more than data.max_rejected_fraction={config.data.max_rejected_fraction}; "
                        f"most common reason: {worst[0]!r} ({worst[1]}x)")
    if stats.train_examples == 0:
        raise DataError(f"data.train: no usable training example in {config.data.train}")
    if stats.eval_examples == 0:
        raise DataError("no eval example: set data.eval to a file or raise data.eval_fraction")


def write_rejected(rejected, folder: str, filesystem: Any = None) -> None:
    """Rejected records with their file and reason, as JSONL under `<run>/rejected/`."""
    rejected.select_columns(["path", "reason", "text"]).write_json(folder, filesystem=filesystem)
