"""The train/eval split by fraction: stable per record, about the asked share, no overlap."""

import numpy as np

from ft_ray.config import ModelConfig
from ft_ray.data.pipeline import parse_and_tokenize, task_model_json
from ft_ray.data.records import eval_bucket
from tests.conftest import DEMO


def split(lines, fraction):
    batch = {"text": np.asarray(lines), "path": np.asarray(["train.jsonl"] * len(lines))}
    return parse_and_tokenize(batch, model_json=task_model_json(ModelConfig()), fmt="auto",
                              eval_fraction=fraction).column("is_eval").to_numpy()


def test_fraction_split_is_stable_and_close_to_the_fraction():
    lines = (DEMO / "train.jsonl").read_text().splitlines()
    first, again = split(lines, 0.1), split(lines[::-1], 0.1)[::-1]
    assert (first == again).all()  # decided by the record itself, not its position or the run
    assert 0.05 < first.mean() < 0.15
    assert not split(lines, 0.0).any() and split(lines, 0.999999).all()


def test_bucket_is_uniform_enough():
    buckets = [eval_bucket(f"record {i}") for i in range(2000)]
    assert 0.45 < np.mean(buckets) < 0.55 and min(buckets) >= 0 and max(buckets) < 1


def test_sample_ids_do_not_depend_on_where_the_data_folder_is():
    lines = np.asarray((DEMO / "train.jsonl").read_text().splitlines()[:50])

    def ids(folder, key="data.train"):
        batch = {"text": lines, "path": np.asarray([f"{folder}/train.jsonl"] * len(lines)),
                 "line": np.arange(1, len(lines) + 1)}
        return parse_and_tokenize(batch, model_json=task_model_json(ModelConfig()), fmt="auto", eval_fraction=0.0,
                                  source=(key, folder)).column("sample_id").to_pylist()

    here = ids("/work/main/ft_ray/assets/demo")
    assert ids("/tmp/another-checkout/ft_ray/assets/demo") == here  # so the training order is the same too
    assert ids("s3://bucket/demo") == here
    assert len(set(here)) == len(here)
    assert set(ids("/work/main/ft_ray/assets/demo", key="data.sources[1]")).isdisjoint(here)
