"""One record at a time, without Ray: its raw text to segments (prompt and trained text) and
tokens, or the RecordError that rejects it with a reason; the stable numbers that place it
(eval split, weighted copies, sample id). The pipeline applies these to blocks of records;
evaluation, `ft-ray validate` and the samples use them directly.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from ft_ray.data.formats import RecordError, Segments, map_fields, record_segments
from ft_ray.data.tokenize import Assembled, assemble_batch, bos_id, encode_batch, tokenize_segments


def eval_bucket(line: str) -> float:
    """A stable number in [0, 1) per record text: the train/eval split needs no shuffle."""
    return int.from_bytes(hashlib.blake2b(line.encode("utf-8"), digest_size=8).digest(), "big") / 2 ** 64


def weighted_copies(weight: float, text: str) -> int:
    """How often a record is trained on per epoch: the whole part of its source's weight,
    plus one for a stable share of records given by the fraction (0.5 = the same half
    every run)."""
    whole = int(weight)
    return whole + (1 if eval_bucket("weight:" + text) < weight - whole else 0)


def sample_id(path: str, line: int, copy: int) -> int:
    """A stable 64-bit id of one example: its file (`source_name`), its line or row, and which
    copy it is."""
    digest = hashlib.blake2b(f"{path}\0{line}\0{copy}".encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


def source_name(path: str, root: str, key: str) -> str:
    """A data file's name as the ids know it: the job's source key and the path below the
    source's folder (`data.train:train.jsonl`), so a job orders its examples the same way
    wherever its data folder is (another checkout, another mount point)."""
    return f"{key}:{path[len(root):].lstrip('/')}" if root and path.startswith(root + "/") else f"{key}:{path}"


def record_to_segments(text: str, error: str, fmt: str, fields: dict[str, str], tokenizer: Any) -> Segments:
    """The segments of one raw record.

    Raises:
        RecordError: with the reason (`kind`) the record is set aside.
    """
    if error:
        kind, _, detail = error.partition(": ")
        raise RecordError(detail, kind)
    try:
        record = json.loads(text)
    except json.JSONDecodeError as e:
        raise RecordError(f"not JSON: {e.msg} at column {e.colno}", "not_json") from None
    except RecursionError:
        raise RecordError("nested too deeply to parse", "too_deep") from None
    try:
        segments = record_segments(map_fields(record, fields), fmt, tokenizer)
    except RecursionError:
        raise RecordError("nested too deeply to read", "too_deep") from None
    for segment, _ in segments:
        try:
            segment.encode("utf-8")
        except UnicodeEncodeError as e:  # "\ud800" parses as JSON, but no tokenizer takes it
            raise RecordError(f"invalid Unicode: {e.reason} at character {e.start}", "bad_unicode") from None
    return segments


def parse_record(text: str, error: str, fmt: str, fields: dict[str, str], tokenizer: Any, max_len: int,
                 drop_over: int | None) -> dict[str, list[int]]:
    """Ids and labels of one raw record (`parse_and_tokenize` does the same for a batch).

    Raises:
        RecordError: with the reason (`kind`) the record is set aside.
    """
    segments = record_to_segments(text, error, fmt, fields, tokenizer)
    return tokenize_segments(segments, tokenizer, max_len, drop_over)


def encode_records(texts: Any, errors: Any, fmt: str, fields: dict[str, str], tokenizer: Any, max_len: int,
                   drop_over: int | None) -> Assembled:
    """The examples of a batch of raw records as flat arrays, and per record the
    RecordError that rejects it (its example is then empty). All segments of the batch go
    through the tokenizer in one call."""
    parsed: list[Segments | RecordError] = []
    for text, error in zip(texts, errors):
        try:
            parsed.append(record_to_segments(text, error, fmt, fields, tokenizer))
        except RecordError as e:
            parsed.append(e)
        except Exception as e:  # noqa: BLE001 - one record's failure, whatever it is, rejects that record
            parsed.append(RecordError(f"{type(e).__name__}: {str(e)[:300]}", "unreadable"))
    try:
        segment_ids = encode_batch(tokenizer, [text for p in parsed if not isinstance(p, RecordError) for text, _ in p])
    except Exception:  # noqa: BLE001 - find the record the tokenizer fails on, reject it, keep the rest
        parsed = [p if isinstance(p, RecordError) else _tokenizable(p, tokenizer) for p in parsed]
        segment_ids = encode_batch(tokenizer, [text for p in parsed if not isinstance(p, RecordError) for text, _ in p])
    segments = [s for p in parsed if not isinstance(p, RecordError) for s in p]
    batch = assemble_batch(segment_ids,
                           [0 if isinstance(p, RecordError) else len(p) for p in parsed],
                           [trainable for _, trainable in segments], bos_id(tokenizer), max_len, drop_over)
    batch.errors = [p if isinstance(p, RecordError) else e for p, e in zip(parsed, batch.errors)]
    return batch


def _tokenizable(segments: Segments, tokenizer: Any) -> Segments | RecordError:
    """The segments, or the RecordError of a record the tokenizer fails on by itself."""
    try:
        encode_batch(tokenizer, [text for text, _ in segments])
        return segments
    except Exception as e:  # noqa: BLE001
        return RecordError(f"the tokenizer failed: {type(e).__name__}: {str(e)[:300]}", "tokenizer_error")


def tokenize_batch(texts: Any, errors: Any, fmt: str, fields: dict[str, str], tokenizer: Any, max_len: int,
                   drop_over: int | None) -> list[dict[str, list[int]] | RecordError]:
    """Per record: its ids and labels, or the RecordError that rejects it (`encode_records`
    as one dict of lists per record)."""
    batch = encode_records(texts, errors, fmt, fields, tokenizer, max_len, drop_over)
    return [error if error is not None else {"input_ids": batch.ids[a:b].tolist(), "labels": batch.labels[a:b].tolist()}
            for error, a, b in zip(batch.errors, batch.offsets, batch.offsets[1:])]


def printable(text: str) -> str:
    """Text that Arrow can store: a lone surrogate quoted from a record becomes `\\ud800`."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")
