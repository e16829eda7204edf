"""`ft-ray validate`: what the data looks like before a cluster is spent on it.

Reads the first records of each source (and counts records, streaming), so it is quick
on a large corpus and needs no Ray.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from ft_ray.config import InputError, JobConfig, SourceConfig, eval_set_metric
from ft_ray.data.formats import RecordError
from ft_ray.data.records import eval_bucket, example_key, parse_record, readable
from ft_ray.data.readers import ReadLimits
from ft_ray.data.sources import DataError, check_format, choose_format, eval_examples, read_records
from ft_ray.data.tokenize import IGNORE_INDEX

PEEK_RECORDS = 100
MIN_TRAIN_EXAMPLES = 100
UNCUT = 1 << 30  # a length no record reaches: peeked records are measured whole


def count_records(source: SourceConfig, config: JobConfig, key: str, eval_fraction: float = 0.0,
                  eval_keys: Counter | None = None, in_train: set | None = None) -> tuple[int, int, int]:
    """(records kept for training, records split off for eval, records that cannot be read:
    not JSON, a broken CSV row, `readable`) of a source, streaming. The keys of `eval_keys` (`example_key`s
    of the data.eval records) that a training record has too are added to `in_train`."""
    train = held_out = unreadable = 0
    for _, _, text, error in read_records(source, config.storage, key, ReadLimits.of(config.data, source)):
        if not readable(text, error):
            unreadable += 1
            continue
        if eval_fraction and eval_bucket(text) < eval_fraction:
            held_out += 1
            continue
        train += 1
        if eval_keys:
            example = example_key(text, source.fields)
            if example in eval_keys:
                in_train.add(example)
    return train, held_out, unreadable


def peek(source: SourceConfig, fmt: str, config: JobConfig, key: str, tokenizer: Any) -> dict[str, Any]:
    """Token lengths (whole, before any cut to `model.max_seq_len`), how many of those tokens
    carry the loss (`data.loss_on`) and problems of the first records of a source."""
    problems: list[str] = []
    lengths: list[int] = []
    examples: list[dict[str, list[int]]] = []
    trained = 0
    seen = 0
    drop_over = config.drop_over
    for path, line, text, error in read_records(source, config.storage, key, ReadLimits.of(config.data, source)):
        if seen >= PEEK_RECORDS:
            break
        seen += 1
        try:
            example = parse_record(text, error, fmt, source.fields, tokenizer, UNCUT, drop_over, config.data.loss_on)
            lengths.append(len(example["input_ids"]))
            trained += sum(label != IGNORE_INDEX for label in example["labels"])
            examples.append(example)
        except RecordError as e:
            problems.append(f"{path}:{line}: {e.kind}: {e}")
    return {"seen": seen, "problems": problems, "lengths": lengths, "trained": trained, "examples": examples}


def lengths_line(lengths: list[int], trained: int, over: int, seen: int, fmt: str, config: JobConfig) -> str:
    """The sorted whole lengths of the first records that can train (of `seen` read), the
    share of their tokens the loss is on, and how many (`over`) `model.max_seq_len` cuts."""
    limit = config.model.max_seq_len
    cut = "split into windows that all train" if fmt == "text" else f"cut at the end: data.overlong {config.data.overlong}"
    first = f"first {seen}" if len(lengths) == seen else f"the {len(lengths)} usable of the first {seen}"
    return (f"tokens per example ({first}): mean {sum(lengths) / len(lengths):.0f}, p95 {p95(lengths)}, "
            f"max {lengths[-1]}, {100 * trained / max(1, sum(lengths)):.0f}% trained (data.loss_on "
            f"{config.data.loss_on}); {over} longer than max_seq_len {limit}" + (f" ({cut})" if over else ""))


def rejected_line(sample: dict[str, Any], key: str, config: JobConfig) -> str | None:
    """A warning when more of a source's first records have problems than
    `data.max_rejected_fraction` lets a run set aside: it would stop once its data is read."""
    bad, seen, most = len(sample["problems"]), sample["seen"], config.data.max_rejected_fraction
    if not seen or bad / seen <= most:
        return None
    return (f"warning: {bad} of the first {seen} {key} records have problems ({bad / seen:.0%}), more than "
            f"data.max_rejected_fraction {most:g} lets a run set aside: training would stop once its data is read; "
            "mend them or raise data.max_rejected_fraction")


def uld_line(examples: list[dict[str, list[int]]], config: JobConfig, key: str, tokenizer: Any) -> str:
    """How many trained tokens of a source's first records (`peek`'s, cut at model.max_seq_len
    as training cuts them) a teacher of another tokenizer (`distill.divergence: uld`) matches:
    the others train on their next-token loss only; and how many tokens of its own it reads
    them in (`plan` counts its forward in the model's)."""
    from ft_ray.models import load_tokenizer
    from ft_ray.train.distillation import CrossTokenizerTeacher, matched_pairs

    reader = CrossTokenizerTeacher(None, tokenizer, load_tokenizer(config.teacher))
    matched = trained = ours = theirs = 0
    for example in examples:
        cut = slice(0, config.model.max_seq_len)
        labels = example["labels"][cut]
        read, matches = reader.teacher_example(example["input_ids"][cut], [y != IGNORE_INDEX for y in labels])
        matched += sum(1 for _ in matched_pairs(matches))
        trained += sum(len(piece.ours) for piece in matches)
        ours, theirs = ours + len(labels), theirs + len(read)
    more = f" ({theirs / ours - 1:.0%} more: ft-ray plan counts the teacher's forward in the model's tokens)" if (
        theirs > ours) else ""
    return (f"{key}: the teacher (uld, its own tokens) matches {matched:,} of the {trained:,} trained tokens of the "
            f"first records ({matched / max(1, trained):.0%}: read after the same text); the others add their "
            f"next-token loss only. It reads those records in {theirs:,} tokens of its own, the model in {ours:,}{more}")


def p95(ordered: list[int]) -> int:
    return ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))]


def checked_format(source: SourceConfig, config: JobConfig, key: str) -> tuple[str, str, str | None]:
    """A source's format, how it was chosen, and a problem line when the job's objective does
    not train on it."""
    fmt, note = choose_format(source, config.storage, key)
    try:
        check_format(config, fmt, key)
    except DataError as e:
        return fmt, note, f"problem: {e}"
    return fmt, note, None


def validate_data(config: JobConfig) -> dict[str, Any]:
    """Counts and readable lines about the job's data; warnings start with 'warning:'."""
    from ft_ray.models import adapter_line, load_tokenizer, model_warnings, rope_overrides

    tokenizer = load_tokenizer(config.model)
    data = config.data
    split_off = 0.0 if data.eval else data.eval_fraction
    train = held_out = unreadable = 0
    tokens = 0.0  # the training tokens, from each source's records and its first records' mean length
    lines = [w if w.startswith("note: ") else f"warning: {w}" for w in model_warnings(config)]
    if config.model.adapter:
        lines.insert(0, adapter_line(config))
    if rope := rope_overrides(config.model):
        stretch = rope["rope_parameters"]
        lines.append(f"model: RoPE stretched ({stretch['rope_type']}, factor {stretch['factor']:g}): "
                     f"{stretch['original_max_position_embeddings']} -> {rope['max_position_embeddings']} positions")
    formats: Counter = Counter()
    problems = 0
    held_out_examples = eval_examples(config) if data.eval else Counter()
    in_train: set[bytes] = set()
    for key, source in data.keyed_sources():
        kept, split, broken = count_records(source, config, key, split_off, held_out_examples, in_train)
        train, held_out, unreadable = train + kept, held_out + split, unreadable + broken
        fmt, note, problem = checked_format(source, config, key)
        if problem:
            lines.append(problem)
            problems += 1
        sample = peek(source, fmt, config, key, tokenizer)
        formats[fmt] += sample["seen"]
        problems += len(sample["problems"])
        lines.append(note)
        if bad := rejected_line(sample, key, config):
            lines.append(bad)
        lengths = sorted(sample["lengths"])
        if not lengths:
            lines.append(f"{key}: none of the first {sample['seen']} records can train" if sample["seen"]
                         else f"{key}: no records")
        else:
            # what training keeps of a record: all of a text (cut into windows), the rest up to max_seq_len
            kept_lengths = lengths if fmt == "text" else [min(n, config.model.max_seq_len) for n in lengths]
            tokens += kept * source.weight * sum(kept_lengths) / len(lengths)
            over = sum(n > config.model.max_seq_len for n in lengths)
            lines.append(f"{key}: {lengths_line(lengths, sample['trained'], over, sample['seen'], fmt, config)}")
            if fmt != "text" and over > len(lengths) // 10:
                lines.append(f"warning: {over} of the first {len(lengths)} {key} records are longer than "
                             f"model.max_seq_len {config.model.max_seq_len} and lose their ends; raise it (p95 "
                             f"{p95(lengths)}) or shorten them")
        lines += [f"problem: {p}" for p in sample["problems"][:10]]
        if config.objective == "distill" and config.distill.divergence == "uld" and not problem:
            try:
                lines.append(uld_line(sample["examples"], config, key, tokenizer))
            except (InputError, OSError, ValueError):
                pass  # no teacher tokenizer here: check_teacher says so
    if data.eval:
        held_out = sum(held_out_examples.values())
        seen = sum(held_out_examples[example] for example in in_train)
        if seen:
            lines.append(f"warning: {seen} of the {held_out} data.eval records are training examples too (the same "
                         "record in the training data): loss and ft-ray eval on them measure recall, not what was learned; "
                         "take them out of one side")
    set_records = {}
    for name, key, source in data.eval_set_sources():
        set_records[name] = count_records(source, config, key, eval_fraction=1.0)[1]  # all held out
        _, note, problem = checked_format(source, config, key)
        if problem:
            lines.append(problem)
            problems += 1
        lines += [note, f"{key}: {set_records[name]} records, scored as {eval_set_metric(name)} at every evaluation"]
    if train < MIN_TRAIN_EXAMPLES:
        beside = f" (and {unreadable} unreadable record{'s' * (unreadable > 1)})" if unreadable else ""
        lines.append(f"warning: only {train} training examples{beside}; with fewer than {MIN_TRAIN_EXAMPLES} "
                     "fine-tuning rarely beats few-shot prompting: collect more before spending GPUs")
    counts = {"train_records": train, "eval_records": held_out, "unreadable_records": unreadable, "formats": dict(formats),
              "problems_in_first_records": problems, "train_tokens_estimate": round(tokens),
              **({"eval_sets": set_records} if set_records else {})}
    return {"counts": counts, "lines": lines}
