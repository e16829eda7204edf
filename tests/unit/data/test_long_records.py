"""Long records: a plain text longer than model.max_seq_len is cut into windows that train
every one of its tokens once; other formats are truncated, and what truncation drops is counted."""

import json

import numpy as np
import pytest

from ft_ray.config import ModelConfig
from ft_ray.data.pipeline import parse_and_tokenize, task_model_json
from ft_ray.data.records import sample_id
from ft_ray.data.tokenize import IGNORE_INDEX, Assembled, cut_into_windows
from ft_ray.models import load_tokenizer
from tests.conftest import DEMO

MODEL = ModelConfig(max_seq_len=128)
ARTICLE = " ".join(json.loads(line)["output"] for line in (DEMO / "train.jsonl").read_text().splitlines()[:40])


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(MODEL)


def rows(records: list[dict], fmt: str, **kwargs) -> list[dict]:
    batch = {"text": np.asarray([json.dumps(r) for r in records]), "path": np.asarray(["d/a.txt"] * len(records)),
             "line": np.arange(1, len(records) + 1)}
    return parse_and_tokenize(batch, model_json=task_model_json(MODEL), fmt=fmt, eval_fraction=0.0,
                              source=("data.train", "d"), **kwargs).to_pylist()


@pytest.mark.parametrize("stride", [0, 16])
def test_a_long_text_is_cut_into_windows_that_train_every_token_once(tokenizer, stride):
    tokens = tokenizer(ARTICLE + tokenizer.eos_token, add_special_tokens=False)["input_ids"]  # as the format ends it
    assert len(tokens) > 5 * MODEL.max_seq_len
    out = rows([{"text": ARTICLE}, {"text": "a short one"}], "text", text_stride=stride)
    windows = [r for r in out if r["line"] == 1]
    assert [r["window"] for r in windows] == list(range(len(windows))) and len(windows) > 5
    assert all(len(r["input_ids"]) <= MODEL.max_seq_len and r["input_ids"][0] == tokenizer.bos_token_id
               for r in windows)
    trained = [label for r in windows for label in r["labels"] if label != IGNORE_INDEX]
    assert trained == tokens  # every token once, in order, the first predicted from the bos
    for before, after in zip(windows, windows[1:]):  # the overlap: the end of the window before, as context
        assert after["input_ids"][1:1 + stride] == before["input_ids"][len(before["input_ids"]) - stride:]
        assert after["labels"][1:1 + stride] == [IGNORE_INDEX] * stride
    # the first window keeps the record's id; the others get ids of their own
    assert windows[0]["sample_id"] == sample_id("data.train:a.txt", 1, 0)
    assert len({r["sample_id"] for r in out}) == len(out)
    assert [r["window"] for r in out if r["line"] == 2] == [0] and not any(r["dropped"] for r in out)


def test_windows_without_a_bos_overlap_by_one_token():
    ids = np.arange(100, 110, dtype=np.int32)
    labels = ids.copy()
    labels[0] = IGNORE_INDEX
    parts = Assembled(ids, labels, np.array([0, 10]), [None], dropped=np.zeros(1, dtype=np.int64))
    cut = cut_into_windows(parts, 4, 0, None)
    windows = [cut.ids[a:b].tolist() for a, b in zip(cut.offsets, cut.offsets[1:])]
    assert windows == [[100, 101, 102, 103], [103, 104, 105, 106], [106, 107, 108, 109]]
    assert cut.labels[cut.labels != IGNORE_INDEX].tolist() == list(range(101, 110))  # all but the first token
    assert cut.records().tolist() == [0, 0, 0]


def test_other_formats_are_truncated_and_the_dropped_tokens_counted(tokenizer):
    long = {"instruction": "Say it at length.", "output": ARTICLE}
    out = rows([long, {"instruction": "Say hi.", "output": "Hi."}], "instruction", text_stride=0)
    prompt = len(tokenizer("Say it at length.", add_special_tokens=False)["input_ids"])
    assert [r["window"] for r in out] == [0, 0] and len(out[0]["input_ids"]) == MODEL.max_seq_len
    assert out[0]["dropped"] > 0 and out[1]["dropped"] == 0
    assert out[0]["dropped"] + MODEL.max_seq_len >= prompt + len(tokenizer(ARTICLE, add_special_tokens=False)["input_ids"])
    # a text under data.overlong: drop is not cut into windows: it is set aside
    [dropped] = rows([{"text": ARTICLE}], "text", text_stride=0, drop_over=MODEL.max_seq_len)
    assert dropped["reason"] == "overlong"
