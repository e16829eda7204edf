"""Segments to token ids with loss labels, and packing of tokenized examples into
fixed-length sequences.

Packed sequences carry `position_ids` that restart at 0 for each example. With no
attention mask, transformers reads the restarts as document boundaries and keeps
attention inside each example (for sdpa, eager and flash attention alike), so packing
changes throughput, not what the model sees.
"""

from __future__ import annotations

import bisect
import dataclasses
import hashlib
import itertools
from typing import Any, Iterable, Iterator

import numpy as np

from ft_ray.data.formats import RecordError, Segments

IGNORE_INDEX = -100


def tokenize_segments(segments: Segments, tokenizer: Any, max_len: int,
                      drop_over: int | None = None) -> dict[str, list[int]]:
    """Token ids and labels for one example; prompt tokens get label -100 (see `assemble`).

    Raises:
        RecordError: longer than `drop_over`, or no trainable token survives truncation.
    """
    return assemble(encode_segments(tokenizer, segments), [trainable for _, trainable in segments], bos_id(tokenizer),
                    max_len, drop_over)


def encode_segments(tokenizer: Any, segments: Segments) -> list[list[int]]:
    """Token ids of one example's segments (`encode_batch`, the later ones `continued`)."""
    return encode_batch(tokenizer, [text for text, _ in segments], [i > 0 for i in range(len(segments))])


def answer_text(tokenizer: Any, text: str) -> str:
    """A trained answer segment as a generated answer reads once decoded (the reference it is
    compared with): without special tokens (the eos, the template's end of turn, which may
    differ from the eos: `<|im_end|>` on a Qwen2.5 base), stripped."""
    return tokenizer.decode(encode_batch(tokenizer, [text])[0], skip_special_tokens=True).strip()


def bos_id(tokenizer: Any) -> int | None:
    """The tokenizer's bos token id, or None. Callers look it up once per batch: transformers'
    attribute lookup costs more than assembling an example."""
    return getattr(tokenizer, "bos_token_id", None)


def encode_batch(tokenizer: Any, texts: list[str], continued: list[bool] | None = None) -> list[list[int]]:
    """Token ids of each text, without special tokens, in one call. A fast tokenizer is
    called directly (transformers' wrapper costs as much as the tokenization itself).

    `continued` marks the texts that go on an example after another (its segments but the
    first): a tokenizer that opens a text with SentencePiece's word mark "▁" (Llama 2's,
    Mistral v0.1-0.3's, Phi-3's) encodes them without it, as it does inside the whole
    example, where only the example's start has one."""
    if not texts:
        return []
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return tokenizer(texts, add_special_tokens=False)["input_ids"]
    inner = without_word_mark(tokenizer) if continued and any(continued) else None
    if inner is None:
        return _encode(backend, texts)
    firsts = [i for i, c in enumerate(continued) if not c]
    rest = [i for i, c in enumerate(continued) if c]
    ids: list[list[int]] = [[]] * len(texts)
    for backend_of, index in ((backend, firsts), (inner, rest)):
        for i, encoded in zip(index, _encode(backend_of, [texts[i] for i in index]) if index else []):
            ids[i] = encoded
    return ids


def _encode(backend: Any, texts: list[str]) -> list[list[int]]:
    encode = getattr(backend, "encode_batch_fast", backend.encode_batch)  # fast: no character offsets
    return [encoding.ids for encoding in encode(texts, add_special_tokens=False)]


def without_word_mark(tokenizer: Any) -> Any:
    """A copy of the fast tokenizer's backend that does not open a text with "▁" (its
    Metaspace pre-tokenizer's `prepend_scheme` "first" or "always" set to "never", a
    normalizer's Prepend("▁") left out), or None when it never does; made once per tokenizer."""
    if not hasattr(tokenizer, "_ft_ray_without_word_mark"):
        import json

        from tokenizers import Tokenizer

        backend = tokenizer.backend_tokenizer
        # the two parts read first: the whole tokenizer's JSON (megabytes) only where one changes
        spec = {name: json.loads(part.__getstate__()) if (part := getattr(backend, name)) is not None else None
                for name in ("normalizer", "pre_tokenizer")}
        changed = False

        def drop_mark(part: Any) -> Any:
            nonlocal changed
            if not isinstance(part, dict):
                return part
            if part.get("type") == "Sequence":
                for key in ("normalizers", "pretokenizers"):
                    if key in part:
                        part[key] = [p for p in (drop_mark(p) for p in part[key]) if p is not None]
                return part
            if part.get("type") == "Prepend" and part.get("prepend") == "▁":
                changed = True
                return None
            if part.get("type") == "Metaspace" and part.get("prepend_scheme", "always") != "never":
                changed = True
                part["prepend_scheme"] = "never"
            return part

        spec = {name: drop_mark(part) for name, part in spec.items()}
        inner = None
        if changed:
            whole = json.loads(backend.to_str())
            whole.update(spec)
            inner = Tokenizer.from_str(json.dumps(whole))
        tokenizer._ft_ray_without_word_mark = inner
    return tokenizer._ft_ray_without_word_mark


def assemble(segment_ids: list[list[int]], trainable: list[bool], bos: int | None, max_len: int,
             drop_over: int | None = None) -> dict[str, list[int]]:
    """One example from its tokenized segments: `assemble_batch` for one record.

    Raises:
        RecordError: longer than `drop_over`, or no trainable token survives truncation.
    """
    batch = assemble_batch(segment_ids, [len(segment_ids)], trainable, bos, max_len, drop_over)
    if batch.errors[0] is not None:
        raise batch.errors[0]
    return {"input_ids": batch.ids.tolist(), "labels": batch.labels.tolist()}


@dataclasses.dataclass
class Assembled:
    """Examples as flat arrays: example i is `ids[offsets[i]:offsets[i + 1]]`, of record
    `record[i]` (None: example i is record i's only one); empty when the record's `errors`
    entry says why it was rejected. `dropped`: per record, the tokens truncation cut off.
    `roles`, for preference data, each token's unit role (`formats.CHOSEN`, `formats.REJECTED`)."""

    ids: np.ndarray
    labels: np.ndarray
    offsets: np.ndarray
    errors: list[RecordError | None]
    roles: np.ndarray | None = None
    dropped: np.ndarray | None = None
    record: np.ndarray | None = None

    def records(self) -> np.ndarray:
        """The record of each example."""
        return np.arange(len(self.errors)) if self.record is None else self.record


def assemble_batch(segment_ids: list[list[int]], segment_counts: list[int], trainable: list[bool], bos: int | None,
                   max_len: int | np.ndarray, drop_over: int | np.ndarray | None = None) -> Assembled:
    """Examples from their tokenized segments (tokenized in one call for a batch of
    records, which is what makes the pipeline fast), in a few array operations for the
    whole batch. Record i has the next `segment_counts[i]` segments; `trainable` says per
    segment whether it is learned from.

    An example longer than `max_len` is truncated, or rejected when it is longer than
    `drop_over` (the `data.overlong: drop` policy). The first token's label is always -100:
    in a packed sequence, it would otherwise be predicted from the end of the previous,
    unrelated example. `bos` (the tokenizer's `bos_id`, or None) leads every example.
    A record is rejected (its `errors` entry) when it is longer than `drop_over` or no
    trainable token survives truncation. `max_len` and `drop_over` may be one per record.
    """
    records = len(segment_counts)
    lead = 0 if bos is None else 1
    seg_len = np.fromiter(map(len, segment_ids), dtype=np.int64, count=len(segment_ids))
    flat = np.fromiter(itertools.chain.from_iterable(segment_ids), dtype=np.int32, count=int(seg_len.sum()))
    record = np.repeat(np.repeat(np.arange(records), segment_counts), seg_len)  # each token's record
    trained = np.repeat(np.asarray(trainable, dtype=bool), seg_len)
    full = np.bincount(record, minlength=records) + lead  # tokens per example before truncation
    starts = np.zeros(records + 1, dtype=np.int64)
    np.cumsum(full - lead, out=starts[1:])
    at = np.arange(len(flat)) - starts[record] + lead  # each token's place in its example
    limit = np.broadcast_to(np.asarray(max_len, dtype=np.int64), (records,))
    kept = at < limit[record]
    targets = np.bincount(record[kept & trained & (at > 0)], minlength=records)
    errors: list[RecordError | None] = [None] * records
    drop = None if drop_over is None else np.broadcast_to(np.asarray(drop_over, dtype=np.int64), (records,))
    for i in np.flatnonzero((full > drop) if drop is not None else np.zeros(records, bool)):
        errors[i] = RecordError(f"{full[i]} tokens, more than data.max_record_tokens={drop[i]}", "overlong")
    for i in np.flatnonzero(targets == 0):
        if errors[i] is None:
            errors[i] = RecordError(f"no trainable tokens within {limit[i]} tokens (prompt too long; "
                                    "a preference pair has half of model.max_seq_len for each answer)"
                                    if np.ndim(max_len) else
                                    f"no trainable tokens within max_seq_len={limit[i]} (prompt too long)",
                                    "no_target_tokens")
    good = np.array([e is None for e in errors], dtype=bool)
    lengths = np.where(good, np.minimum(full, limit), 0)
    dropped = np.where(good, full - lengths, 0)
    offsets = np.zeros(records + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    ids = np.empty(int(offsets[-1]), dtype=np.int32)
    labels = np.empty_like(ids)
    kept &= good[record]
    into = offsets[record[kept]] + at[kept]
    ids[into] = flat[kept]
    labels[into] = np.where(trained[kept], flat[kept], IGNORE_INDEX)
    firsts = offsets[:-1][good]
    if lead:
        ids[firsts] = bos
    labels[firsts] = IGNORE_INDEX
    return Assembled(ids, labels, offsets, errors, dropped=dropped)


def cut_into_windows(parts: Assembled, max_len: int, stride: int, bos: int | None) -> Assembled:
    """Every example longer than `max_len` as consecutive windows of at most `max_len`
    tokens, so that every token of it is trained once (plain text: continued pre-training
    on long documents). Each window starts with `bos` when there is one; the first
    `stride` tokens of each later window repeat the end of the one before as context, with
    label -100 (without a bos, at least one token: a window's first token is never
    predicted). Shorter examples, and rejected records (empty), stay one example each."""
    if np.diff(parts.offsets).max(initial=0) <= max_len:
        return parts
    lead = 0 if bos is None else 1
    room = max_len - lead  # the record's own tokens per window
    overlap = stride if lead else max(stride, 1)
    step = room - overlap
    if step <= 0:
        raise ValueError(f"a window of {max_len} tokens with {overlap} of overlap has no room for new text")
    ids, labels, lengths, records = [], [], [], []
    for record, (a, b) in enumerate(zip(parts.offsets[:-1], parts.offsets[1:])):
        body = slice(a + lead, b)  # without the example's own bos
        size = b - a - lead
        starts = [0] if size + lead <= max_len else range(0, size - overlap, step)
        for k, start in enumerate(starts):
            end = min(start + room, size)
            window_ids, window_labels = parts.ids[body][start:end], parts.labels[body][start:end].copy()
            if k:
                window_labels[:overlap] = IGNORE_INDEX  # trained in the window before
            if lead and b > a:
                window_ids, window_labels = np.r_[bos, window_ids], np.r_[IGNORE_INDEX, window_labels]
            ids.append(window_ids)
            labels.append(window_labels)
            lengths.append(len(window_ids))
            records.append(record)
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return Assembled(np.concatenate(ids).astype(np.int32), np.concatenate(labels).astype(np.int32), offsets,
                     parts.errors, dropped=parts.dropped, record=np.asarray(records, dtype=np.int64))


def pack_examples(examples: Iterable[dict], max_len: int, pad_id: int) -> Iterator[dict[str, np.ndarray]]:
    """Packed sequences of a batch of examples (dicts of input_ids, labels and optionally
    sample_id), one dict per sequence; see `pack_arrays`."""
    yield from _rows(pack_arrays(*_flat(list(examples)), max_len, pad_id))


def pad_example(example: dict, max_len: int, pad_id: int) -> dict[str, np.ndarray]:
    """One example per sequence (packing off): right-padded to `max_len`."""
    return next(_rows(pack_arrays(*_flat([example]), max_len, pad_id, pack=False)))


def _flat(examples: list[dict]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    offsets = np.zeros(len(examples) + 1, dtype=np.int64)
    np.cumsum([len(e["input_ids"]) for e in examples], out=offsets[1:])
    ids = np.concatenate([np.asarray(e["input_ids"], dtype=np.int64) for e in examples] or [np.zeros(0, np.int64)])
    labels = np.concatenate([np.asarray(e["labels"], dtype=np.int64) for e in examples] or [np.zeros(0, np.int64)])
    return ids, labels, offsets, np.array([e.get("sample_id", 0) for e in examples], dtype=np.int64)


def _rows(sequences: dict[str, np.ndarray]) -> Iterator[dict[str, np.ndarray]]:
    for i in range(len(sequences["num_tokens"])):
        yield {k: v[i] for k, v in sequences.items()}


def pack_arrays(ids: np.ndarray, labels: np.ndarray, offsets: np.ndarray, sample_ids: np.ndarray, max_len: int,
                pad_id: int, pack: bool = True, roles: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Best-fit-decreasing packing of a batch of examples into sequences of exactly `max_len`
    tokens: longest examples first, each into the open sequence it fills best. On mixed
    lengths this leaves under 3% padding where first-fit in arrival order leaves 4-5%.
    Without `pack`, each example gets a sequence of its own, right-padded.

    The examples come flat (example i's tokens are `ids[offsets[i]:offsets[i + 1]]`); the
    sequences come out as 2-D arrays built by one scatter, not a copy per example. The
    examples inside a sequence keep their arrival order, and sequences come out in the order
    they were opened, so a seeded shuffle before packing still fixes the order. Padding gets
    label -100 and positions of its own. Ids, labels and positions are int32 (half the
    bytes in the object store and in prepared data; the training loop reads them as int64).

    `roles` (preference data: each token's unit role) come out as a `roles` column, padding 0;
    positions restart where the role changes inside an example, so a pair's rejected
    sequence attends to its own copy of the prompt, not to the chosen one.
    """
    offsets = np.asarray(offsets, dtype=np.int64) - offsets[0]
    lengths = np.diff(offsets)
    if len(lengths) and lengths.max() > max_len:
        raise ValueError(f"an example of {lengths.max()} tokens does not fit max_len={max_len}")
    bins = np.asarray(_best_fit(lengths.tolist(), max_len) if pack else range(len(lengths)), dtype=np.int64)
    count = int(bins.max()) + 1 if len(bins) else 0
    by_bin = np.lexsort((np.arange(len(bins)), bins))  # each sequence's examples, in arrival order
    before = np.cumsum(lengths[by_bin]) - lengths[by_bin]
    first = np.searchsorted(bins[by_bin], bins[by_bin])
    start = np.empty_like(lengths)
    start[by_bin] = before - before[first]  # where each example starts in its sequence
    into = np.repeat(bins * max_len + start - offsets[:-1], lengths) + np.arange(offsets[-1])
    out_ids = np.full(count * max_len, pad_id, dtype=np.int32)
    out_labels = np.full(count * max_len, IGNORE_INDEX, dtype=np.int32)
    positions = np.zeros(count * max_len, dtype=np.int32)
    out_ids[into], out_labels[into] = ids, labels
    positions[into] = _positions(offsets, lengths, roles)
    used = np.bincount(bins, weights=lengths, minlength=count).astype(np.int64)
    column, filled = np.arange(max_len, dtype=np.int32)[None, :], used.astype(np.int32)[:, None]
    positions = np.where(column >= filled, column - filled, positions.reshape(count, max_len))
    members = np.split(np.asarray(sample_ids, dtype=np.int64)[by_bin], np.flatnonzero(np.diff(bins[by_bin])) + 1)
    packed = {"input_ids": out_ids.reshape(count, max_len), "labels": out_labels.reshape(count, max_len),
              "position_ids": positions, "num_examples": np.bincount(bins, minlength=count).astype(np.int64),
              "num_tokens": used, "seq_id": np.array([sequence_id(m) for m in members] if count else [], dtype=np.int64)}
    if roles is not None:
        out_roles = np.zeros(count * max_len, dtype=np.int32)
        out_roles[into] = roles
        packed["roles"] = out_roles.reshape(count, max_len)
    return packed


def _positions(offsets: np.ndarray, lengths: np.ndarray, roles: np.ndarray | None) -> np.ndarray:
    """Each token's position in its sequence: counted from its example's start, or from where
    its role began inside the example."""
    tokens = np.arange(offsets[-1])
    if roles is None:
        return tokens - np.repeat(offsets[:-1], lengths)
    restart = np.zeros(len(tokens), dtype=bool)
    restart[offsets[:-1][lengths > 0]] = True
    restart[1:] |= roles[1:] != roles[:-1]
    return tokens - np.maximum.accumulate(np.where(restart, tokens, 0))


def _best_fit(lengths: list[int], max_len: int) -> list[int]:
    """The sequence each example goes to: longest first, into the open sequence with the
    least room that still fits it (a sorted list of (free tokens, sequence) finds it)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    bins = [0] * len(lengths)
    rooms: list[tuple[int, int]] = []
    opened = 0
    for i in order:
        size = lengths[i]
        at = bisect.bisect_left(rooms, (size, -1))
        if at < len(rooms):
            free, b = rooms.pop(at)
        else:
            free, b, opened = max_len, opened, opened + 1
        bins[i] = b
        bisect.insort(rooms, (free - size, b))
    return bins


def sequence_id(sample_ids: Any) -> np.int64:
    """One id per packed sequence, from the ids of the examples in it (in order): two runs
    that feed the same sequence ids fed the same samples."""
    digest = hashlib.blake2b(np.asarray(sample_ids, dtype=np.int64).tobytes(), digest_size=8).digest()
    return np.int64(int.from_bytes(digest, "big", signed=True))
