"""Hugging Face datasets as sources, without Ray: folders written by `save_to_disk` (one
split, or a DatasetDict and its `split`) of every format, a local dataset repository folder
through the hub code path (`datasets.load_dataset_builder`), and a hub dataset from the local
cache in offline mode. Each gives the same records, with row numbers, as the JSONL it came from."""

import json
import shutil

import pytest

from ft_ray.config import SourceConfig, StorageConfig
from ft_ray.data.sources import DataError, choose_format, list_files, read_records
from tests.conftest import ASSETS, DEMO

STORAGE = StorageConfig()


def jsonl_records(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def kto_records() -> list[dict]:
    return [{"prompt": p["instruction"], "completion": p["chosen" if i % 2 else "rejected"], "label": bool(i % 2)}
            for i, p in enumerate(jsonl_records(DEMO / "preference-eval.jsonl"))]


FORMATS = {"text": jsonl_records(ASSETS / "text.jsonl"), "instruction": jsonl_records(ASSETS / "instruction.jsonl"),
           "chat": jsonl_records(ASSETS / "chat.jsonl"), "completion": jsonl_records(ASSETS / "completion.jsonl"),
           "preference": jsonl_records(DEMO / "preference-eval.jsonl"), "kto": kto_records()}


def read(source: SourceConfig) -> list[tuple[int, dict]]:
    return [(line, json.loads(text)) for _, line, text, error in read_records(source, STORAGE, "data.train")
            if not error]


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_saved_dataset_of_each_format_reads_like_its_jsonl(tmp_path, fmt):
    import datasets

    records = FORMATS[fmt] * (4 // len(FORMATS[fmt]) + 1)  # enough rows for two files
    datasets.Dataset.from_list(records).save_to_disk(str(tmp_path / "saved"), num_shards=2)
    source = SourceConfig(path=str(tmp_path / "saved"))
    fs, files = list_files(source, STORAGE)
    assert [f.rsplit("/", 1)[1] for f in files] == ["data-00000-of-00002.arrow", "data-00001-of-00002.arrow"]
    rows = read(source)
    assert [record for _, record in rows] == records  # in order, across the two files
    first = (len(records) + 1) // 2  # rows counted per file, as for Parquet
    assert [line for line, _ in rows] == [*range(1, first + 1), *range(1, len(records) - first + 1)]
    assert choose_format(source, STORAGE, "data.train")[0] == fmt


def test_a_saved_dataset_dict_takes_its_split(tmp_path):
    import datasets

    train, test = FORMATS["instruction"], FORMATS["instruction"][:1]
    datasets.DatasetDict({"train": datasets.Dataset.from_list(train), "test": datasets.Dataset.from_list(test)}
                         ).save_to_disk(str(tmp_path / "saved"))
    assert [r for _, r in read(SourceConfig(path=str(tmp_path / "saved")))] == train  # default: train
    assert [r for _, r in read(SourceConfig(path=str(tmp_path / "saved"), split="test"))] == test
    with pytest.raises(DataError, match="has no split 'validation' \\(it has train, test\\); set split"):
        list_files(SourceConfig(path=str(tmp_path / "saved"), split="validation"), STORAGE)


def dataset_repository(folder, records: dict[str, list[dict]]):
    """A dataset repository as on the hub: data files named by split."""
    (folder / "data").mkdir(parents=True)
    for split, rows in records.items():
        (folder / "data" / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def test_a_local_dataset_repository_through_the_hub_code_path(tmp_path):
    repo = dataset_repository(tmp_path / "support", {"train": FORMATS["chat"], "test": FORMATS["chat"][:1]})
    source = SourceConfig(hf=str(repo), split="test")
    fs, files = list_files(source, STORAGE)
    assert files == [str(repo / "data" / "test.jsonl")]
    assert [r for _, r in read(SourceConfig(hf=str(repo)))] == FORMATS["chat"]
    with pytest.raises(DataError, match="has no split 'dev'"):
        list_files(SourceConfig(hf=str(repo), split="dev"), STORAGE)
    # many hub datasets are CSV files: read as ft-ray reads a .csv path (values as strings)
    (tmp_path / "faq" / "data").mkdir(parents=True)
    (tmp_path / "faq" / "data" / "train.csv").write_text(
        "prompt,completion\n" + "".join(f'"{r["prompt"]}","{r["completion"]}"\n' for r in FORMATS["completion"]))
    assert [r for _, r in read(SourceConfig(hf=str(tmp_path / "faq")))] == FORMATS["completion"]


def test_a_hub_dataset_in_the_local_cache_reads_offline(tmp_path, monkeypatch):
    import datasets
    import huggingface_hub.constants

    # what `load_dataset("house/support")` leaves in the cache, made from a local copy of it
    repo = dataset_repository(tmp_path / "support", {"train": FORMATS["completion"]})
    cache = tmp_path / "cache"
    datasets.load_dataset(str(repo), cache_dir=str(cache))
    shutil.move(cache / "support", cache / "house___support")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)  # HF_HUB_OFFLINE=1
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    source = SourceConfig(hf="house/support", split="train")
    fs, files = list_files(source, STORAGE)
    assert len(files) == 1 and files[0].startswith(str(cache / "house___support")) and files[0].endswith(".arrow")
    assert [r for _, r in read(source)] == FORMATS["completion"]
    assert choose_format(source, STORAGE, "data.train")[0] == "completion"


def test_a_source_is_a_path_or_an_hf_dataset():
    with pytest.raises(ValueError, match="either a path or an hf dataset"):
        SourceConfig(path="a.jsonl", hf="org/name")
    with pytest.raises(ValueError, match="revision and subset are settings of an hf source"):
        SourceConfig(path="a.jsonl", revision="main")
    assert SourceConfig(hf="org/name", revision="v1").where == "hf:org/name@v1 [train]"
