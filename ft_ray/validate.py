"""`ft-ray validate`: what the data looks like before a cluster is spent on it.

Reads the first records of each source (and counts records, streaming), so it is quick
on a large corpus and needs no Ray.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from ft_ray.config import JobConfig, SourceConfig
from ft_ray.data.formats import RecordError
from ft_ray.data.records import eval_bucket, parse_record
from ft_ray.data.readers import ReadLimits
from ft_ray.data.sources import DataError, check_format, choose_format, read_records

PEEK_RECORDS = 100
MIN_TRAIN_EXAMPLES = 100


def count_records(source: SourceConfig, config: JobConfig, key: str, eval_fraction: float = 0.0) -> tuple[int, int]:
    """(records kept for training, records split off for eval) of a source, streaming."""
    train = held_out = 0
    for _, _, text, _ in read_records(source, config.storage, key, ReadLimits.of(config.data, source)):
        if eval_fraction and eval_bucket(text) < eval_fraction:
            held_out += 1
        else:
            train += 1
    return train, held_out


def peek(source: SourceConfig, fmt: str, config: JobConfig, key: str, tokenizer: Any) -> dict[str, Any]:
    """Token lengths and problems of the first records of a source."""
    problems: list[str] = []
    lengths: list[int] = []
    seen = 0
    drop_over = config.drop_over
    for path, line, text, error in read_records(source, config.storage, key, ReadLimits.of(config.data, source)):
        if seen >= PEEK_RECORDS:
            break
        seen += 1
        try:
            example = parse_record(text, error, fmt, source.fields, tokenizer, config.model.max_seq_len, drop_over)
            lengths.append(len(example["input_ids"]))
        except RecordError as e:
            problems.append(f"{path}:{line}: {e.kind}: {e}")
    return {"seen": seen, "problems": problems, "lengths": lengths}


def validate_data(config: JobConfig) -> dict[str, Any]:
    """Counts and readable lines about the job's data; warnings start with 'warning:'."""
    from ft_ray.models import context_window_warning, load_tokenizer

    tokenizer = load_tokenizer(config.model)
    data = config.data
    split_off = 0.0 if data.eval else data.eval_fraction
    train = held_out = 0
    tokens = 0.0  # the training tokens, from each source's records and its first records' mean length
    lines: list[str] = [f"warning: {w}" for w in [context_window_warning(config.model)] if w]
    formats: Counter = Counter()
    problems = 0
    for key, source in data.keyed_sources():
        kept, split = count_records(source, config, key, split_off)
        train, held_out = train + kept, held_out + split
        fmt, note = choose_format(source, config.storage, key)
        try:
            check_format(config, fmt, key)
        except DataError as e:
            lines.append(f"problem: {e}")
            problems += 1
        sample = peek(source, fmt, config, key, tokenizer)
        formats[fmt] += sample["seen"]
        problems += len(sample["problems"])
        lengths = sample["lengths"] or [0]
        tokens += kept * source.weight * sum(lengths) / len(lengths)
        lines += [note, f"{key}: tokens per example (first {sample['seen']}): mean {sum(lengths) / len(lengths):.0f}, "
                        f"max {max(lengths)} (max_seq_len {config.model.max_seq_len})"]
        lines += [f"problem: {p}" for p in sample["problems"][:10]]
    if data.eval:
        held_out, _ = count_records(data.eval_source(), config, "data.eval")
    if train < MIN_TRAIN_EXAMPLES:
        lines.append(f"warning: only {train} training examples; with fewer than {MIN_TRAIN_EXAMPLES} "
                     "fine-tuning rarely beats few-shot prompting: collect more before spending GPUs")
    counts = {"train_records": train, "eval_records": held_out, "formats": dict(formats),
              "problems_in_first_records": problems, "train_tokens_estimate": round(tokens)}
    return {"counts": counts, "lines": lines}
