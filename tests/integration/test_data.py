"""The Ray Data pipeline on real files: bad records set aside with file, line and reason,
weighted sources, every file kind, S3 sources, a stable sample order, prepared data."""

from __future__ import annotations

import csv
import gzip
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ft_ray.config import config_from_dict, resolve_paths
from ft_ray.data import pipeline, sources
from ft_ray.data.pipeline import DataError, build_datasets
from ft_ray.data.prepared import datasets_for, load_prepared, prepare
from ft_ray.data.sources import list_files
from ft_ray.models import load_tokenizer
from tests.conftest import DEMO, make_bucket, tiny_job

pytestmark = pytest.mark.integration

GOOD = [json.loads(line) for line in (DEMO / "train.jsonl").read_text().splitlines()]
BAD = [  # (line as written, the reason it must be rejected for)
    (b"{not json", "not_json"),
    (b'{"instruction": "caf\xe9", "output": "x"}', "not_utf8"),
    (b'{"instruction": "Say hi."}', "missing_field"),
    (b'{"instruction": "Say hi.", "output": 5}', "wrong_type"),
    (b'{"instruction": "Say hi.", "output": "   "}', "empty_field"),
    (json.dumps({"instruction": "Say hi.", "output": "hello " * 300}).encode(), "overlong"),
    (b'["a", "list"]', "not_object"),
]
CHAT_BAD = [
    (json.dumps({"messages": [{"role": "robot", "content": "x"}, {"role": "assistant", "content": "y"}]}).encode(),
     "unknown_role"),
    (json.dumps({"messages": [{"role": "user", "content": "only a question"}]}).encode(), "no_assistant"),
]


def chat(record: dict) -> dict:
    return {"messages": [{"role": "user", "content": record["instruction"]},
                         {"role": "assistant", "content": record["output"]}]}


def write_lines(path: Path, good: list[dict], bad: list[tuple[bytes, str]], every: int = 5) -> dict[int, str]:
    """Good records with bad ones mixed in; returns {line: reason} of the bad ones."""
    lines, expected = [], {}
    bad = list(bad)
    for i, record in enumerate(good):
        lines.append(json.dumps(record).encode())
        if i % every == every - 1 and bad:
            raw, reason = bad.pop(0)
            lines.append(raw)
            expected[len(lines)] = reason
    path.write_bytes(b"\n".join(lines) + b"\n")
    return expected


def config_for(tmp_path: Path, **data):
    job = tiny_job(tmp_path)
    job["data"] = {"eval": str(DEMO / "eval.jsonl"), **data}
    return resolve_paths(config_from_dict(job))


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(config_from_dict(tiny_job(Path("."))).model)


def test_every_bad_record_is_set_aside_with_file_line_and_reason(ray_local, tmp_path, tokenizer):
    expected = {("instructions.jsonl", line): reason
                for line, reason in write_lines(tmp_path / "instructions.jsonl", GOOD[:40], BAD).items()}
    expected |= {("chats.jsonl", line): reason
                 for line, reason in write_lines(tmp_path / "chats.jsonl", [chat(r) for r in GOOD[40:50]],
                                                 CHAT_BAD, every=4).items()}
    config = config_for(tmp_path, sources=[{"path": str(tmp_path / "instructions.jsonl")},
                                           {"path": str(tmp_path / "chats.jsonl"), "weight": 2}],
                        overlong="drop", max_record_tokens=120, max_rejected_fraction=0.2)
    datasets, stats = build_datasets(config, tokenizer, str(tmp_path / "rejected"))

    assert stats.formats == {"data.sources[0]": "instruction", "data.sources[1]": "chat", "data.eval": "instruction"}
    assert stats.records_rejected == len(BAD) + len(CHAT_BAD) == 9
    assert stats.rejected_by_reason == {reason: 1 for reason in expected.values()}
    assert stats.records_read == 40 + 10 + 9 + 48  # good + rejected = every record of both sources and eval
    assert stats.train_examples == 40 + 2 * 10  # the chat source counts twice (weight 2)
    assert stats.eval_examples == 48
    rows = [json.loads(line) for f in (tmp_path / "rejected").glob("*.json") for line in f.read_text().splitlines()]
    assert {(Path(r["path"]).name, r["line"]): r["reason"] for r in rows} == expected
    not_utf8 = next(r for r in rows if r["reason"] == "not_utf8")
    assert "\\xe9" in not_utf8["text"] and "offset" in not_utf8["detail"]

    config.data.max_rejected_fraction = 0.05
    with pytest.raises(DataError, match=r"9 of 107 records rejected \(8.4%\), more than data.max_rejected_fraction"):
        build_datasets(config, tokenizer, None)


def test_every_file_kind_with_field_mapping_and_fractional_weight(ray_local, tmp_path, tokenizer, monkeypatch):
    folder = tmp_path / "corpus"
    folder.mkdir()
    with gzip.open(folder / "a.jsonl.gz", "wt") as f:
        f.writelines(json.dumps(r) + "\n" for r in GOOD[:20])
    (folder / "b.json").write_text(json.dumps(GOOD[20:40]))
    with open(folder / "c.csv", "w", newline="", encoding="utf-8-sig") as f:  # as Excel saves it: a BOM, CRLF
        writer = csv.DictWriter(f, ["instruction", "input", "output"])
        writer.writeheader()
        writer.writerows({"input": "", **r} for r in GOOD[60:80])
    pq.write_table(pa.Table.from_pylist([{"question": r["instruction"], "answer": r["output"]} for r in GOOD[40:60]]),
                   tmp_path / "qa.parquet", row_group_size=5)
    monkeypatch.setattr(sources, "RANGE_MIN_BYTES", 1)  # as if the files were large: read in ranges / row groups
    (tmp_path / "notes.txt").write_text("\n\n".join(f"Note {i}: Northwind tents pitch fast." for i in range(10)))
    (tmp_path / "segments.jsonl").write_text("".join(json.dumps({"segments": [  # Axolotl's input_output
        {"text": f"Q: {r['instruction']}\n", "label": False}, {"text": f"A: {r['output']}", "label": True}]}) + "\n"
        for r in GOOD[80:90]))
    config = config_for(tmp_path, sources=[
        {"path": str(folder)},
        {"path": str(tmp_path / "qa.parquet"), "fields": {"instruction": "question", "output": "answer"}},
        {"path": str(tmp_path / "notes.txt"), "weight": 0.5},
        {"path": str(tmp_path / "segments.jsonl")}])
    split = sources.read_units(*list_files(config.data.sources[1], config.storage, "x"), 4)
    assert len(split) > 1 and all(u.row_groups for u in split)  # the parquet file: several read tasks
    _, stats = build_datasets(config, tokenizer, None)
    assert stats.records_rejected == 0 and stats.records_read == 60 + 20 + 10 + 10 + 48
    assert stats.formats["data.sources[1]"] == "instruction" and stats.formats["data.sources[2]"] == "text"
    assert stats.formats["data.sources[3]"] == "segments"
    assert 90 + 2 <= stats.train_examples <= 90 + 8  # a stable half of the 10 notes, give or take the hash


def trained_tokens(dataset) -> int:
    return sum(int((np.asarray(r["labels"]) != -100).sum()) for r in dataset.select_columns(["labels"]).take_all())


def test_loss_on_reaches_the_packed_labels(ray_local, tmp_path, tokenizer):
    """`data.loss_on` decides which tokens of the packed sequences carry the loss."""
    from ft_ray.data.records import parse_record

    turns = [{"messages": chat(a)["messages"] + chat(b)["messages"]} for a, b in zip(GOOD[:80:2], GOOD[1:80:2])]
    write_lines(tmp_path / "turns.jsonl", turns, [])
    trained = {}
    for loss_on in ("all", "last_answer"):
        config = config_for(tmp_path, train=str(tmp_path / "turns.jsonl"), loss_on=loss_on)
        trained[loss_on] = trained_tokens(build_datasets(config, tokenizer, None)[0]["train"])
        examples = [parse_record(json.dumps(t), "", "chat", {}, tokenizer, 128, None, loss_on) for t in turns]
        assert trained[loss_on] == sum(sum(label != -100 for label in e["labels"]) for e in examples)
    assert trained["all"] > 2 * trained["last_answer"] > 0


def test_long_text_lines_train_every_token_and_truncated_records_are_counted(ray_local, tmp_path, tokenizer,
                                                                             monkeypatch, capfd):
    from ft_ray.data import sources
    from ft_ray.data.records import eval_bucket

    # one article per line, most far longer than max_seq_len (128), read in byte ranges
    outputs = [r["output"].replace("\n", " ") for r in GOOD]
    articles = [" ".join(outputs[i:i + 3 + (i * 7) % 40]) for i in range(0, len(outputs) - 40, 3)]
    (tmp_path / "wiki.txt").write_text("\n".join(articles) + "\n")
    monkeypatch.setattr(sources, "RANGE_MIN_BYTES", 64 << 10)
    monkeypatch.setattr(sources, "RANGE_MAX_BYTES", 64 << 10)
    config = config_for(tmp_path, train=str(tmp_path / "wiki.txt"), eval=None, eval_fraction=0.05)
    datasets, stats = build_datasets(config, tokenizer, None)
    assert "1 of plain text read by line (data.text_unit)" in capfd.readouterr().out
    lengths = [len(tokenizer(a + tokenizer.eos_token, add_special_tokens=False)["input_ids"]) for a in articles]
    held_out = [eval_bucket(json.dumps({"text": a}, ensure_ascii=False)) < 0.05 for a in articles]
    assert stats.records_read == len(articles) and stats.records_windowed > len(articles) / 2
    assert (stats.records_truncated, stats.tokens_dropped) == (0, 0)
    trained = trained_tokens(datasets["train"])
    assert trained == sum(n for n, out in zip(lengths, held_out) if not out)  # every token once, eval aside
    assert trained + trained_tokens(datasets["eval"]) == sum(lengths) and trained >= 0.9 * sum(lengths)

    # instructions are not cut into windows: truncated, and counted
    long = [(a, n) for a, n in zip(articles, lengths) if n > 200][:30]
    write_lines(tmp_path / "long.jsonl", GOOD[:200] + [{"instruction": "Tell me more.", "output": a} for a, _ in long], [])
    _, stats = build_datasets(config_for(tmp_path, train=str(tmp_path / "long.jsonl")), tokenizer, None)
    assert stats.records_truncated == len(long) and stats.records_windowed == 0
    assert stats.tokens_dropped >= sum(n - 127 for _, n in long)  # at least the answer's tokens past 127 (bos)
    assert stats.tokens_dropped_fraction > 0.01
    out = capfd.readouterr().out
    assert f"{stats.records_truncated} records are longer than model.max_seq_len=128 and were cut" in out
    assert f"records truncated       {stats.records_truncated} ({stats.tokens_dropped} tokens dropped" in \
        pipeline.stats_table(stats)


def training_order(datasets: dict) -> list[int]:
    return [r["seq_id"] for r in datasets["train"].select_columns(["seq_id"]).take_all()]


def same_order_twice(config, tokenizer) -> tuple[list[int], object]:
    """The packed training order of two builds of the same job: they must agree."""
    first, stats = build_datasets(config, tokenizer, None)
    order = training_order(first)
    assert order == training_order(build_datasets(config, tokenizer, None)[0])
    assert len(set(order)) == len(order) == stats.train_sequences
    for split, examples in (("train", stats.train_examples), ("eval", stats.eval_examples)):
        counts = first[split].select_columns(["num_examples", "num_tokens", "labels"]).take_all()
        assert sum(int(r["num_examples"]) for r in counts) == examples  # every example packed once
        assert all(r["labels"].dtype == np.int32 for r in counts)  # half the bytes of int64
    assert sum(int(r["num_tokens"]) for r in first["train"].select_columns(["num_tokens"]).take_all()) == stats.train_tokens
    return order, stats


def test_same_seed_same_sample_order_and_prepared_data_matches(ray_local, tmp_path, tokenizer, capsys):
    from ray.util.state import list_actors

    # data.eval_sets: the eval file once more, as a set of its own
    config = config_for(tmp_path, train=str(DEMO / "train.jsonl"), eval_sets={"again": str(DEMO / "eval.jsonl")})
    order, stats = same_order_twice(config, tokenizer)
    assert stats.eval_sets == {"again": {"examples": stats.eval_examples, "sequences": stats.eval_sequences}}
    config.data.shuffle_seed = 7
    assert training_order(build_datasets(config, tokenizer, None)[0]) != order
    config.data.shuffle_seed = None

    assert load_prepared(config) is None
    _, prepared_stats, where = prepare(config, tokenizer)
    assert where.startswith(str(tmp_path / "runs" / "prepared"))
    actors = {actor.actor_id for actor in list_actors(limit=10_000)}
    datasets, loaded_stats = datasets_for(config, tokenizer, str(tmp_path / "rejected"), None)
    assert "using prepared data at " + where in capsys.readouterr().out
    # a process per actor: Ray's default Parquet reader started 32 for each split it read
    assert [actor.class_name for actor in list_actors(limit=10_000) if actor.actor_id not in actors] == []
    assert loaded_stats == prepared_stats == stats
    assert training_order(datasets) == order
    packed = [[r["input_ids"].tolist() + r["labels"].tolist() for r in datasets[split].take_all()]
              for split in ("eval", "eval.again")]
    assert packed[0] == packed[1]  # the same records, packed the same way

    # A prepare killed while writing stats.json: the folder counts as incomplete and is prepared
    # again over what the killed one left (no example twice).
    stats_file = Path(where) / "stats.json"
    stats_file.write_text(stats_file.read_text()[:40])
    assert load_prepared(config) is None
    assert "stats.json is unreadable (JSONDecodeError" in capsys.readouterr().out
    prepare(config, tokenizer)
    again, again_stats, _ = load_prepared(config)
    assert again_stats == stats and training_order(again) == order
    config.model.max_seq_len = 96  # another packing: another fingerprint, nothing prepared for it
    assert load_prepared(config) is None


def test_large_sets_take_the_hash_shuffle_and_keep_their_order_run_to_run(ray_local, tmp_path, tokenizer,
                                                                           monkeypatch):
    config = config_for(tmp_path, train=str(DEMO / "train.jsonl"))
    small = training_order(build_datasets(config, tokenizer, None)[0])
    monkeypatch.setattr(pipeline, "SMALL_SHUFFLE_TOKENS", 0)  # as if the corpus were large
    order, _ = same_order_twice(config, tokenizer)
    assert order != small and sorted(order) == sorted(small)


def test_hash_shuffled_order_does_not_depend_on_the_blocks_the_read_made(ray_local):
    """Ray sizes read blocks by the cluster's CPUs: a resume on another cluster must still
    see the same order (the small sets' path: the test after next)."""
    import ray.data

    rows = [{"sample_id": i * 7919 % 1000, "input_ids": [i], "labels": [i]} for i in range(300)]
    orders = [[r["sample_id"] for r in pipeline.shuffle(ray.data.from_items(rows).repartition(blocks), 3, 300)
               .take_all()] for blocks in (1, 5, 12)]
    assert orders[0] == orders[1] == orders[2] and sorted(orders[0]) == sorted(r["sample_id"] for r in rows)


def ranged_corpus(folder: Path) -> list[int]:
    """A JSONL file whose ranges end mid-line, on a newline, inside CRLF pairs and in blank
    runs, with a line longer than a range and no newline at the end; and a small file.
    Returns the line numbers of the large file's records."""
    lines = [json.dumps(r).encode() for r in GOOD[:12]]
    lines[3] = json.dumps({"instruction": "long " * 100, "output": "x"}).encode()
    lines[5] += b"\r"
    lines[7:7] = [b"", b"", b'{"instruction": "caf\xe9", "output": "x"}']
    (folder / "big.jsonl").write_bytes(b"\n".join(lines))
    (folder / "small.jsonl").write_bytes(lines[0] + b"\n")
    return [1, 2, 3, 4, 5, 6, 7, 10, 11, 12, 13, 14, 15]


def test_byte_ranges_of_a_jsonl_file_give_every_record_once_with_its_line(tmp_path, monkeypatch):
    from ft_ray.config import StorageConfig
    from ft_ray.data import sources
    from ft_ray.data.readers import ReadLimits

    big_lines = ranged_corpus(tmp_path)
    whole = list(sources.read_records(str(tmp_path), StorageConfig(), "data.train"))
    assert [line for path, line, _, _ in whole if path.endswith("big.jsonl")] == big_lines
    fs, files = sources.list_files(str(tmp_path), StorageConfig())
    for span in [*range(1, 120), 333, 640, 5000]:
        monkeypatch.setattr(sources, "RANGE_MIN_BYTES", span)
        monkeypatch.setattr(sources, "RANGE_MAX_BYTES", span)
        units = sources.read_units(fs, files, cpus=2, in_ray=False)
        assert len(units) == sum(max(1, -(-(tmp_path / f).stat().st_size // span)) for f in ("big.jsonl", "small.jsonl"))
        rows = [row for unit in units for block in sources._read_units(fs, [unit], 3, ReadLimits()) for row in block.to_pylist()]
        assert [(r["path"], r["line"], r["text"], r["error"]) for r in rows] == whole, span
        groups = sources.task_groups(units, cpus=2)  # what one read task reads: about a span
        assert [u for group in groups for u in group] == units
        total, largest = sum(u.bytes for u in units), max(u.bytes for u in units)
        assert all(sum(u.bytes for u in group) <= total / len(groups) + largest for group in groups)


def test_read_tasks_are_balanced(tmp_path):
    """Eight equal files on 2 CPUs: four read tasks of two files each (two per CPU, none
    left alone at the end), in file order."""
    from ft_ray.data.readers import Unit
    from ft_ray.data.sources import task_groups

    units = [Unit(f"part-{i}.jsonl", 3_400_000) for i in range(8)]
    groups = task_groups(units, cpus=2)
    assert groups == [units[0:2], units[2:4], units[4:6], units[6:8]]
    assert task_groups(units[:1], cpus=8) == [units[:1]]


def test_a_large_file_is_read_by_several_tasks(ray_local, tmp_path, tokenizer, monkeypatch):
    """The same records through Ray Data, one read task per range (some ranges, inside the
    long line, hold no record), and through the whole pipeline on both shuffle paths."""
    import ray.data

    from ft_ray.config import StorageConfig
    from ft_ray.data import sources

    ranged_corpus(tmp_path)
    monkeypatch.setattr(sources, "RANGE_MIN_BYTES", 256)
    monkeypatch.setattr(sources, "RANGE_MAX_BYTES", 256)
    # the pipeline reads in order (build_datasets sets it); a test run alone starts without it
    monkeypatch.setattr(ray.data.DataContext.get_current().execution_options, "preserve_order", True)
    fs, files = sources.list_files(str(tmp_path), StorageConfig())
    dataset = sources.read_corpus(fs, files).materialize()
    units = sources.read_units(fs, files, cpus=4)
    assert dataset.num_blocks() == len(sources.task_groups(units, cpus=4)) > 5
    got = [(r["path"], r["line"], r["text"], r["error"]) for r in dataset.take_all()]
    assert got == list(sources.read_records(str(tmp_path), StorageConfig(), "data.train"))
    config = config_for(tmp_path, train=str(tmp_path), max_rejected_fraction=0.2)
    _, stats = build_datasets(config, tokenizer, None)
    assert stats.records_read == len(got) + stats.eval_examples  # the eval set is the demo's
    assert stats.rejected_by_reason == {"not_utf8": 1, "no_target_tokens": 1}  # the long prompt fills max_seq_len
    monkeypatch.setattr(pipeline, "SMALL_SHUFFLE_TOKENS", 0)  # the hash shuffle's path
    assert build_datasets(config, tokenizer, None)[1] == stats

    # a CSV file whose quoted values hold newlines: its ranges start at rows (a task parses it once)
    (tmp_path / "table").mkdir()
    (tmp_path / "table" / "t.csv").write_text("instruction,output\n" + "".join(
        f'"question {i}\nline two",answer {i}\n' for i in range(80)))
    fs, files = sources.list_files(str(tmp_path / "table"), StorageConfig())
    units = sources.read_units(fs, files, cpus=4)
    assert len(units) > 3 and {u.header for u in units} == {("instruction", "output")}
    got = [(r["path"], r["line"], r["text"], r["error"]) for r in sources.read_corpus(fs, files).take_all()]
    assert got == list(sources.read_records(str(tmp_path / "table"), StorageConfig(), "data.train"))
    assert [line for _, line, _, _ in got] == list(range(2, 162, 2))


def test_packed_order_does_not_depend_on_how_the_files_were_split_for_reading(ray_local, tmp_path, tokenizer,
                                                                              monkeypatch):
    """The same packed sequences whether the corpus was read by one task or by twenty (and
    packed by several tasks: small packing batches)."""
    from ft_ray.data import sources

    monkeypatch.setattr(pipeline, "PACK_BATCH", 16)
    monkeypatch.setattr(pipeline, "MAX_PACK_TASK_BATCHES", 3)
    config = config_for(tmp_path, train=str(DEMO / "train.jsonl"))
    whole = training_order(build_datasets(config, tokenizer, None)[0])
    monkeypatch.setattr(sources, "RANGE_MIN_BYTES", 4096)
    monkeypatch.setattr(sources, "RANGE_MAX_BYTES", 4096)
    fs, files = sources.list_files(str(DEMO / "train.jsonl"), config.storage)
    assert len(sources.read_units(fs, files, cpus=4)) > 10
    assert training_order(build_datasets(config, tokenizer, None)[0]) == whole and len(whole) > 20


def test_s3_sources_and_prepared_data_in_s3(ray_local, s3_server, tmp_path, tokenizer, monkeypatch):
    from ft_ray.data import sources

    monkeypatch.setattr(sources, "RANGE_MIN_BYTES", 64)  # b.jsonl is read in two byte ranges
    monkeypatch.setattr(sources, "RANGE_MAX_BYTES", 64)
    client = make_bucket(s3_server, "corpus")
    client.put_object(Bucket="corpus", Key="team/a.jsonl.gz",
                      Body=gzip.compress("".join(json.dumps(r) + "\n" for r in GOOD[:30]).encode()))
    client.put_object(Bucket="corpus", Key="team/b.jsonl", Body=b"{broken\n" + json.dumps(GOOD[30]).encode())
    job = tiny_job(tmp_path, storage={"path": "s3://corpus/runs", "endpoint_url": s3_server})
    job["data"] = {"train": "s3://corpus/team/", "eval_fraction": 0.2, "max_rejected_fraction": 0.1}
    config = resolve_paths(config_from_dict(job))
    _, stats, where = prepare(config, tokenizer)
    assert where.startswith("s3://corpus/runs/prepared/")
    assert stats.records_read == 32 and stats.rejected_by_reason == {"not_json": 1}
    assert stats.train_examples + stats.eval_examples == 31
    keys = [o["Key"] for o in client.list_objects_v2(Bucket="corpus", Prefix="runs/prepared/")["Contents"]]
    assert any(k.endswith("/stats.json") for k in keys) and any("/train/" in k for k in keys)
    assert any("/rejected/" in k for k in keys)
    datasets, loaded, _ = load_prepared(config)
    assert loaded == stats and datasets["train"].count() == stats.train_sequences
    fs, files = sources.list_files("s3://corpus/team/", config.storage)
    assert len(sources.read_units(fs, files, cpus=4)) > 2  # the .gz file whole, b.jsonl in ranges
    assert [(r["path"], r["line"]) for r in sources.read_corpus(fs, files).take_all()][-2:] == [
        ("s3://corpus/team/b.jsonl", 1), ("s3://corpus/team/b.jsonl", 2)]


def test_hugging_face_datasets_are_prepared_as_sources(ray_local, tmp_path, tokenizer, capfd):
    """A `save_to_disk` folder (instructions, one row bad), a saved DatasetDict (chats with tool
    calls; its test split held out) and a local dataset repository read through the hub code
    path (completions), mixed by weight, prepared with `format: auto` (prepared data trains as
    any: tests/integration/test_preference.py's DPO run)."""
    import datasets

    from tests.unit.data.test_hf_sources import dataset_repository
    from tests.unit.data.test_tool_calls import OPENAI

    instructions = GOOD[:120]
    instructions[7] = {"instruction": "Say hi.", "output": "   "}
    datasets.Dataset.from_list(instructions).save_to_disk(str(tmp_path / "saved"))
    chats = [chat(r) for r in GOOD[120:200]] + [OPENAI] * 10
    datasets.DatasetDict({"train": datasets.Dataset.from_list(chats), "test": datasets.Dataset.from_list(
        [chat(r) for r in GOOD[200:240]])}).save_to_disk(str(tmp_path / "dict"))
    repo = dataset_repository(tmp_path / "completions", {"train": [
        {"prompt": r["instruction"], "completion": r["output"]} for r in GOOD[240:320]]})
    job = tiny_job(tmp_path, run_name="hf-sources", train={"max_steps": 4, "eval_every": 4, "checkpoint_every": 4})
    job["data"] = {"sources": [{"path": str(tmp_path / "saved")}, {"path": str(tmp_path / "dict"), "weight": 0.5},
                               {"hf": str(repo)}],
                   "eval": {"path": str(tmp_path / "dict"), "split": "test"}, "max_rejected_fraction": 0.05}
    config = resolve_paths(config_from_dict(job))
    _, stats, where = prepare(config, tokenizer)
    assert stats.formats == {"data.sources[0]": "instruction", "data.sources[1]": "chat",
                             "data.sources[2]": "completion", "data.eval": "chat"}
    assert "format auto -> chat" in capfd.readouterr().out
    assert stats.records_read == 120 + 90 + 80 + 40 and stats.rejected_by_reason == {"empty_field": 1}
    assert 119 + 25 + 80 <= stats.train_examples <= 119 + 65 + 80 and stats.eval_examples == 40  # about half the chats
    [rejected] = [json.loads(line) for f in Path(where, "rejected").glob("*.json*") for line in f.read_text().splitlines()]
    assert rejected["path"].endswith("saved/data-00000-of-00001.arrow") and rejected["line"] == 8  # its row
