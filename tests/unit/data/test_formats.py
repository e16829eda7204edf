"""Record formats: detection, rendering, and which text is trainable."""

import json

import pytest

from ft_ray.config import ModelConfig
from ft_ray.data.formats import RecordError, alpaca_prompt, detect_format, record_segments
from ft_ray.models import load_tokenizer
from tests.conftest import ASSETS


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(ModelConfig())


def first(name):
    return json.loads((ASSETS / f"{name}.jsonl").read_text().splitlines()[0])


@pytest.mark.parametrize("name", ["text", "instruction", "chat", "completion"])
def test_detects_each_format(name):
    assert detect_format(first(name)) == name


def test_unknown_shape_says_what_was_expected():
    with pytest.raises(RecordError, match=r"cannot tell the format from keys \['body'\]"):
        detect_format({"body": "x"})


def test_text_is_all_trainable_and_ends_with_eos(tokenizer):
    assert record_segments(first("text"), "auto", tokenizer) == [
        ("Northwind tents pitch in three minutes.<|end|>", True)]


def test_instruction_prompt_is_masked_output_trained(tokenizer):
    record = json.loads((ASSETS / "instruction.jsonl").read_text().splitlines()[1])
    segments = record_segments(record, "instruction", tokenizer)
    assert segments == [(alpaca_prompt("Translate to French.", "tent"), False), ("tente<|end|>", True)]
    assert "### Input:\ntent" in segments[0][0]


def test_instruction_without_input_has_no_input_block(tokenizer):
    [(prompt, trainable), _] = record_segments(first("instruction"), "instruction", tokenizer)
    assert "### Input" not in prompt and not trainable


def test_completion_prompt_masked(tokenizer):
    assert record_segments(first("completion"), "auto", tokenizer) == [
        ("The capital of France is", False), (" Paris.<|end|>", True)]


def test_chat_renders_the_template_exactly_and_trains_assistant_turns_only(tokenizer):
    record = first("chat")
    segments = record_segments(record, "chat", tokenizer)
    rendered = tokenizer.apply_chat_template(record["messages"], tokenize=False)
    assert "".join(text for text, _ in segments) == rendered
    trained = [text for text, trainable in segments if trainable]
    assert trained == ["Hello.<|end|>\n", "Goodbye.<|end|>\n"]
    assert all("<|assistant|>" not in text for text in trained)  # the header is prompt


@pytest.mark.parametrize("record, reason", [
    ({"messages": [{"role": "robot", "content": "x"}]}, "unknown role 'robot'"),
    ({"messages": [{"role": "user", "content": "only a question"}]}, "no assistant message"),
    ({"messages": []}, "non-empty list"),
    ({"instruction": "do", "output": 3}, "field 'output' must be a string, got int"),
    ({"instruction": "do", "output": "  "}, "field 'output' is empty"),
    ({"prompt": "p"}, "missing field 'completion'"),
    ({"instruction": "do it"}, "missing field 'output'"),
    (["not", "an", "object"], "expected a JSON object, got list"),
])
def test_bad_records_say_why(tokenizer, record, reason):
    with pytest.raises(RecordError, match=reason):
        record_segments(record, "auto", tokenizer)


def test_forced_format_with_missing_field(tokenizer):
    with pytest.raises(RecordError, match="missing field 'completion'"):
        record_segments({"prompt": "p", "text": "t"}, "completion", tokenizer)
