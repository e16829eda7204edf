"""One record at a time, without Ray: its raw text to segments (prompt and trained text) and
tokens, or the RecordError that rejects it with a reason; the stable numbers that place it
(eval split, weighted copies, sample id). The pipeline applies these to blocks of records;
evaluation, `ft-ray validate` and the samples use them directly.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import numpy as np

from ft_ray.data.formats import SFT, RecordError, Segments, Units, map_fields, record_units, with_loss_on
from ft_ray.data.tokenize import Assembled, assemble_batch, bos_id, cut_into_windows, encode_batch


def eval_bucket(line: str) -> float:
    """A stable number in [0, 1) per record text: the train/eval split needs no shuffle."""
    return int.from_bytes(hashlib.blake2b(line.encode("utf-8"), digest_size=8).digest(), "big") / 2 ** 64


def weighted_copies(weight: float, text: str) -> int:
    """How often a record is trained on per epoch: the whole part of its source's weight,
    plus one for a stable share of records given by the fraction (0.5 = the same half
    every run)."""
    whole = int(weight)
    return whole + (1 if eval_bucket("weight:" + text) < weight - whole else 0)


def example_key(text: str, fields: dict[str, str]) -> bytes:
    """One example's identity in whatever file it is: the record parsed, its columns named as
    ft-ray names them, its keys sorted (the text as it is when it is not JSON). Finds held-out
    records that are training records too."""
    try:
        text = json.dumps(map_fields(json.loads(text), fields), sort_keys=True, ensure_ascii=False)
    except (ValueError, RecursionError):
        pass
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest()


def readable(text: str, error: str) -> bool:
    """Whether a record read from a file is JSON (it may still lack the fields a format needs):
    what counts of examples count."""
    if error:
        return False
    try:
        json.loads(text)
    except (ValueError, RecursionError):
        return False
    return True


def sample_id(path: str, line: int, copy: int, window: int = 0) -> int:
    """A stable 64-bit id of one example: its file (`source_name`), its line or row, which
    copy it is and, for a long text cut into windows, which window (the first keeps the
    record's id)."""
    key = f"{path}\0{line}\0{copy}" + (f"\0{window}" if window else "")
    digest = hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


def source_name(path: str, root: str, key: str) -> str:
    """A data file's name as the ids know it: the job's source key and the path below the
    source's folder (`data.train:train.jsonl`), so a job orders its examples the same way
    wherever its data folder is (another checkout, another mount point)."""
    return f"{key}:{path[len(root):].lstrip('/')}" if root and path.startswith(root + "/") else f"{key}:{path}"


def record_to_segments(text: str, error: str, fmt: str, fields: dict[str, str], tokenizer: Any) -> Segments:
    """The segments of one raw record (of a preference pair: the prompt and its chosen answer).

    Raises:
        RecordError: with the reason (`kind`) the record is set aside.
    """
    return record_to_units(text, error, fmt, fields, tokenizer)[0][0]


def record_to_units(text: str, error: str, fmt: str, fields: dict[str, str], tokenizer: Any) -> Units:
    """The units of one raw record (`formats.record_units`).

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
        units = record_units(map_fields(record, fields), fmt, tokenizer)
    except RecursionError:
        raise RecordError("nested too deeply to read", "too_deep") from None
    for segments, _ in units:
        for segment, _ in segments:
            try:
                segment.encode("utf-8")
            except UnicodeEncodeError as e:  # "\ud800" parses as JSON, but no tokenizer takes it
                raise RecordError(f"invalid Unicode: {e.reason} at character {e.start}", "bad_unicode") from None
    return units


def parse_record(text: str, error: str, fmt: str, fields: dict[str, str], tokenizer: Any, max_len: int,
                 drop_over: int | None, loss_on: str = "answers") -> dict[str, list[int]]:
    """Ids and labels of one raw record (`parse_and_tokenize` does the same for a batch).

    Raises:
        RecordError: with the reason (`kind`) the record is set aside.
    """
    batch = encode_records([text], [error], fmt, fields, tokenizer, max_len, drop_over, loss_on=loss_on)
    if batch.errors[0] is not None:
        raise batch.errors[0]
    return {"input_ids": batch.ids.tolist(), "labels": batch.labels.tolist(),
            **({"roles": batch.roles.tolist()} if batch.roles is not None else {})}


def encode_records(texts: Any, errors: Any, fmt: str, fields: dict[str, str], tokenizer: Any, max_len: int,
                   drop_over: int | None, text_stride: int | None = None, loss_on: str = "answers") -> Assembled:
    """The examples of a batch of raw records as flat arrays, and per record the
    RecordError that rejects it (its example is then empty). All segments of the batch go
    through the tokenizer in one call. Records longer than `max_len` are truncated (the
    tokens cut off counted in `dropped`) or, with `text_stride` set, records of the `text`
    format are cut into windows that all train (`tokenize.cut_into_windows`, that many
    tokens of overlap) and one record may give several examples. `loss_on` (`data.loss_on`)
    says which text of a supervised example trains (`formats.with_loss_on`).

    A preference record's example is its units one after the other (a pair: prompt + chosen,
    then prompt + rejected, each with its own leading token and each cut at half of
    `max_len`, so the pair fits one packed row); `roles` then gives each token's unit role."""
    parsed: list[Units | RecordError] = []
    for text, error in zip(texts, errors):
        try:
            parsed.append(with_loss_on(record_to_units(text, error, fmt, fields, tokenizer), loss_on))
        except RecordError as e:
            parsed.append(e)
        except Exception as e:  # noqa: BLE001 - one record's failure, whatever it is, rejects that record
            parsed.append(RecordError(f"{type(e).__name__}: {str(e)[:300]}", "unreadable"))
    try:
        segment_ids = encode_batch(tokenizer, _texts(parsed), _continued(parsed))
    except Exception:  # noqa: BLE001 - find the record the tokenizer fails on, reject it, keep the rest
        parsed = [p if isinstance(p, RecordError) else _tokenizable(p, tokenizer) for p in parsed]
        segment_ids = encode_batch(tokenizer, _texts(parsed), _continued(parsed))
    # every record has at least one unit (a rejected record one empty unit), so a batch of
    # supervised records is assembled as before: one example per record
    units = [unit for p in parsed for unit in _units_of(p)]
    sizes = [len(_units_of(p)) for p in parsed]
    counts = np.repeat(sizes, sizes)  # per unit: how many units its record has
    paired = bool(len(counts)) and counts.max() > 1  # a pair's two sequences share one row: half each
    windowed = text_stride is not None and fmt == "text" and drop_over is None
    limits = max_len // counts if paired else (UNCUT if windowed else max_len)
    drops = drop_over // counts if paired and drop_over is not None else drop_over
    bos = bos_id(tokenizer)
    parts = assemble_batch(segment_ids, [len(segments) for segments, _ in units],
                           [trainable for segments, _ in units for _, trainable in segments], bos, limits, drops)
    roles = np.array([role for _, role in units], dtype=np.int32)
    if not roles.any():  # supervised records only: one unit each, as assembled
        parts.errors = [p if isinstance(p, RecordError) else e for p, e in zip(parsed, parts.errors)]
        return cut_into_windows(parts, max_len, text_stride, bos) if windowed else parts
    return _join_units(parsed, parts, roles)


UNCUT = 2 ** 40  # a length limit no record reaches


def _units_of(parsed: Units | RecordError) -> Units:
    return [([], SFT)] if isinstance(parsed, RecordError) else parsed


def _texts(parsed: list) -> list[str]:
    return [text for p in parsed for segments, _ in _units_of(p) for text, _ in segments]


def _continued(parsed: list) -> list[bool]:
    """Per text of `_texts`: whether it follows another segment of its unit (`encode_batch`)."""
    return [i > 0 for p in parsed for segments, _ in _units_of(p) for i in range(len(segments))]


def _join_units(parsed: list, parts: Assembled, roles: np.ndarray) -> Assembled:
    """Records' examples from their assembled units (`parts`): a record is rejected whole
    when any of its units is, or when a pair's two sequences came out the same."""
    unit_of_record = np.repeat(np.arange(len(parsed)), [len(_units_of(p)) for p in parsed])
    unit_lengths = np.diff(parts.offsets)
    errors: list[RecordError | None] = []
    for i, p in enumerate(parsed):
        units = np.flatnonzero(unit_of_record == i)
        error = p if isinstance(p, RecordError) else next((parts.errors[u] for u in units if parts.errors[u]), None)
        if error is None and len(units) == 2:
            first, second = (parts.ids[parts.offsets[u]:parts.offsets[u + 1]] for u in units)
            if np.array_equal(first, second):
                error = RecordError("chosen and rejected are the same within the tokens a pair has "
                                    "(half of model.max_seq_len)", "identical_pair")
        errors.append(error)
    good = np.array([e is None for e in errors], dtype=bool)
    keep = np.repeat(good[unit_of_record], unit_lengths)
    lengths = np.bincount(unit_of_record, weights=unit_lengths * good[unit_of_record],
                          minlength=len(parsed)).astype(np.int64)
    offsets = np.zeros(len(parsed) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    dropped = np.bincount(unit_of_record, weights=parts.dropped * good[unit_of_record], minlength=len(parsed))
    return Assembled(parts.ids[keep], parts.labels[keep], offsets, errors, np.repeat(roles, unit_lengths)[keep],
                     dropped.astype(np.int64))


def _tokenizable(units: Units, tokenizer: Any) -> Units | RecordError:
    """The units, or the RecordError of a record the tokenizer fails on by itself."""
    try:
        encode_batch(tokenizer, [text for segments, _ in units for text, _ in segments])
        return units
    except Exception as e:  # noqa: BLE001
        return RecordError(f"the tokenizer failed: {type(e).__name__}: {str(e)[:300]}", "tokenizer_error")


def tokenize_batch(texts: Any, errors: Any, fmt: str, fields: dict[str, str], tokenizer: Any, max_len: int,
                   drop_over: int | None) -> list[dict[str, list[int]] | RecordError]:
    """Per record: its ids and labels, or the RecordError that rejects it (`encode_records`
    as one dict of lists per record)."""
    batch = encode_records(texts, errors, fmt, fields, tokenizer, max_len, drop_over)
    return [error if error is not None else {"input_ids": batch.ids[a:b].tolist(), "labels": batch.labels[a:b].tolist(),
                                             **({"roles": batch.roles[a:b].tolist()} if batch.roles is not None else {})}
            for error, a, b in zip(batch.errors, batch.offsets, batch.offsets[1:])]


def printable(text: str) -> str:
    """Text that Arrow can store: a lone surrogate quoted from a record becomes `\\ud800`."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")
