"""`ft-ray validate`: what the data looks like before a cluster is spent on it.

Reads the first records of each file (and counts lines, streaming), so it is quick on a
large corpus and needs no Ray.
"""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

from ft_ray.config import JobConfig
from ft_ray.data.formats import RecordError, detect_format, record_segments
from ft_ray.data.pipeline import eval_bucket, list_files
from ft_ray.data.tokenize import tokenize_segments

PEEK_RECORDS = 100
MIN_TRAIN_EXAMPLES = 100


def count_records(files: list[str], eval_fraction: float = 0.0) -> tuple[int, int]:
    """(records kept for training, records split off for eval) of JSONL files, by line."""
    train = held_out = 0
    for path in files:
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                if not line.strip():
                    continue
                if eval_fraction and eval_bucket(line.rstrip("\n")) < eval_fraction:
                    held_out += 1
                else:
                    train += 1
    return train, held_out


def peek(files: list[str], config: JobConfig, tokenizer: Any) -> dict[str, Any]:
    """Formats, token lengths and problems of the first records."""
    formats: Counter = Counter()
    problems: list[str] = []
    lengths: list[int] = []
    seen = 0
    for path in files:
        with open(path, encoding="utf-8", errors="replace") as f:
            for number, line in enumerate(f, start=1):
                if seen >= PEEK_RECORDS:
                    break
                if not line.strip():
                    continue
                seen += 1
                try:
                    record = json.loads(line)
                    fmt = detect_format(record) if config.data.format == "auto" else config.data.format
                    example = tokenize_segments(record_segments(record, fmt, tokenizer), tokenizer,
                                                config.model.max_seq_len)
                    formats[fmt] += 1
                    lengths.append(len(example["input_ids"]))
                except json.JSONDecodeError as e:
                    problems.append(f"{path}:{number}: not JSON: {e.msg}")
                except RecordError as e:
                    problems.append(f"{path}:{number}: {e}")
        if seen >= PEEK_RECORDS:
            break
    return {"seen": seen, "formats": dict(formats), "problems": problems, "lengths": lengths}


def validate_data(config: JobConfig) -> dict[str, Any]:
    """Counts and readable lines about the job's data; warnings start with 'warning:'."""
    from ft_ray.models import load_tokenizer

    tokenizer = load_tokenizer(config.model)
    data = config.data
    train_files = list_files(data.train, "data.train")
    train, held_out = count_records(train_files, 0.0 if data.eval else data.eval_fraction)
    if data.eval:
        held_out, _ = count_records(list_files(data.eval, "data.eval"))
    sample = peek(train_files, config, tokenizer)
    lengths = sample["lengths"] or [0]
    lines = [f"format: {_describe_formats(sample['formats'], sample['seen'], data.format)}",
             f"tokens per example (first {sample['seen']}): mean {sum(lengths) / len(lengths):.0f}, "
             f"max {max(lengths)} (max_seq_len {config.model.max_seq_len})"]
    lines += [f"problem: {p}" for p in sample["problems"][:10]]
    if train < MIN_TRAIN_EXAMPLES:
        lines.append(f"warning: only {train} training examples; with fewer than {MIN_TRAIN_EXAMPLES} "
                     "fine-tuning rarely beats few-shot prompting: collect more before spending GPUs")
    counts = {"train_records": train, "eval_records": held_out, "train_files": len(train_files),
              "formats": sample["formats"], "problems_in_first_records": len(sample["problems"])}
    return {"counts": counts, "lines": lines}


def _describe_formats(formats: dict[str, int], seen: int, configured: str) -> str:
    if not formats:
        return "none recognised in the first records"
    shown = ", ".join(f"{name} ({n} of {seen})" for name, n in sorted(formats.items(), key=lambda kv: -kv[1]))
    return f"{shown}{' (detected)' if configured == 'auto' else ''}"
