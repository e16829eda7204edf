"""Loss masks and packing: what the model is trained on, and that packed examples stay apart."""

import numpy as np
import pytest
import torch

from ft_ray.config import ModelConfig
from ft_ray.data.formats import RecordError, record_segments
from ft_ray.data.tokenize import IGNORE_INDEX, pack_examples, pad_example, tokenize_segments
from ft_ray.models import load_base_model, load_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(ModelConfig())


def example(n, start=10):
    ids = list(range(start, start + n))
    return {"input_ids": ids, "labels": [IGNORE_INDEX] + ids[1:]}


def test_prompt_tokens_get_ignore_label(tokenizer):
    segments = [("Question: why?\n", False), ("Because.<|end|>", True)]
    out = tokenize_segments(segments, tokenizer, max_len=64)
    prompt_len = 1 + len(tokenizer("Question: why?\n", add_special_tokens=False)["input_ids"])
    assert out["input_ids"][0] == tokenizer.bos_token_id
    assert out["labels"][:prompt_len] == [IGNORE_INDEX] * prompt_len
    assert out["labels"][prompt_len:] == out["input_ids"][prompt_len:]
    assert tokenizer.decode(out["input_ids"][prompt_len:]) == "Because.<|end|>"


def test_first_label_is_always_ignored(tokenizer):
    out = tokenize_segments([("all of it is trained", True)], tokenizer, max_len=64)
    assert out["labels"][0] == IGNORE_INDEX and out["labels"][1] == out["input_ids"][1]


def test_truncation_that_removes_every_target_rejects_the_record(tokenizer):
    with pytest.raises(RecordError, match="no trainable tokens within max_seq_len=4"):
        tokenize_segments([("a long prompt that fills the window", False), ("answer", True)], tokenizer, 4)


def test_packing_fills_sequences_and_restarts_positions():
    examples = [example(n, start=100 * i) for i, n in enumerate([5, 3, 7, 2, 6])]
    packed = list(pack_examples(examples, max_len=10, pad_id=0))
    assert all(p["input_ids"].shape == (10,) for p in packed)
    assert sum(int(p["num_tokens"]) for p in packed) == 23  # no token lost or duplicated
    assert sum(int(p["num_examples"]) for p in packed) == 5
    for p in packed:
        starts = np.flatnonzero(p["position_ids"] == 0)
        # each example (and the padding) starts at position 0 and counts up from there
        for a, b in zip(starts, list(starts[1:]) + [10]):
            assert list(p["position_ids"][a:b]) == list(range(b - a))
        assert (p["labels"][int(p["num_tokens"]):] == IGNORE_INDEX).all()


def test_examples_are_never_split_across_sequences():
    examples = [example(n, start=100 * i) for i, n in enumerate([6, 6, 6])]
    packed = list(pack_examples(examples, max_len=10, pad_id=0))
    assert len(packed) == 3
    for p in packed:
        ids = [i for i in p["input_ids"][: int(p["num_tokens"])]]
        assert ids == list(range(ids[0], ids[0] + 6))


def test_padding_without_packing():
    p = pad_example(example(3), max_len=6, pad_id=0)
    assert list(p["input_ids"]) == [10, 11, 12, 0, 0, 0]
    assert list(p["labels"]) == [IGNORE_INDEX, 11, 12, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX]


def test_attention_does_not_cross_packed_examples(tokenizer):
    """Logits of an example packed after another equal its logits alone."""
    model = load_base_model(ModelConfig()).eval()
    records = [{"text": "Hi Ada, thanks for writing to Northwind."}, {"text": "Good news: the tent ships today."}]
    examples = [tokenize_segments(record_segments(r, "text", tokenizer), tokenizer, 64) for r in records]
    [packed] = list(pack_examples(examples, max_len=64, pad_id=tokenizer.pad_token_id))
    first_len, second_len = (len(e["input_ids"]) for e in examples)
    with torch.no_grad():
        together = model(input_ids=torch.tensor(packed["input_ids"])[None],
                         position_ids=torch.tensor(packed["position_ids"])[None], use_cache=False).logits
        alone = model(input_ids=torch.tensor(examples[1]["input_ids"])[None], use_cache=False).logits
    torch.testing.assert_close(together[0, first_len:first_len + second_len], alone[0], atol=1e-4, rtol=1e-4)


def test_a_sentencepiece_word_mark_opens_the_example_only(tokenizer):
    """A tokenizer that opens a text with SentencePiece's "▁" (Llama 2, Mistral v0.1-0.3,
    Phi-3: Metaspace, prepend_scheme "first") gives each example the ids of its whole text:
    the segments after the first are encoded without the mark, which the whole text has only
    at its start. Before, each turn opened with a "▁" the model never sees at inference.
    A byte-level tokenizer (the built-in one) is left as it is."""
    import json

    from ft_ray.data.records import parse_record
    from ft_ray.data.tokenize import without_word_mark
    from tests.conftest import sentencepiece_tokenizer

    spm = sentencepiece_tokenizer()
    record = {"messages": [{"role": "user", "content": "Where is my tent?"},
                           {"role": "assistant", "content": "Hello Ben. Your tent ships today."},
                           {"role": "user", "content": "Thanks!"}, {"role": "assistant", "content": "Warmly, the team."}]}
    example = parse_record(json.dumps(record), "", "chat", {}, spm, 512, None)
    whole = spm(spm.apply_chat_template(record["messages"], tokenize=False), add_special_tokens=False)["input_ids"]
    assert example["input_ids"] == [spm.bos_token_id] + whole
    trained = [i for i, label in zip(example["input_ids"], example["labels"]) if label != IGNORE_INDEX]
    assert spm.decode(trained) == "Hello Ben. Your tent ships today.</s>Warmly, the team.</s>"
    assert without_word_mark(spm) is not None and without_word_mark(tokenizer) is None
