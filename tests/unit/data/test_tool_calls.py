"""Tool-calling conversations: OpenAI `messages` with `tool_calls`/`tool` turns and ShareGPT
`function_call`/`observation` turns, each with its `tools`, rendered by the built-in chat
template; the function calls are trained on, the tool results never."""

import json

import numpy as np
import pytest

from ft_ray.config import ModelConfig, SourceConfig, StorageConfig
from ft_ray.data.formats import RecordError, record_segments
from ft_ray.data.records import parse_record
from ft_ray.data.sources import choose_format
from ft_ray.data.tokenize import IGNORE_INDEX
from ft_ray.models import load_tokenizer

WEATHER = {"name": "get_weather", "description": "The weather in a city now",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
OPENAI = {"messages": [
    {"role": "user", "content": "Is it cold in Oslo?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": \"Oslo\"}"}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "{\"celsius\": -3}"},
    {"role": "assistant", "content": "Yes: -3 degrees right now."}],
    "tools": [{"type": "function", "function": WEATHER}]}
SHAREGPT = {"conversations": [
    {"from": "human", "value": "Is it cold in Oslo?"},
    {"from": "function_call", "value": json.dumps({"name": "get_weather", "arguments": {"city": "Oslo"}})},
    {"from": "observation", "value": "{\"celsius\": -3}"},
    {"from": "gpt", "value": "Yes: -3 degrees right now."}],
    "tools": json.dumps([WEATHER])}


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(ModelConfig())


@pytest.mark.parametrize("record", [OPENAI, SHAREGPT], ids=["openai", "sharegpt"])
def test_function_calls_train_and_tool_results_never(tokenizer, record):
    example = parse_record(json.dumps(record), "", "auto", {}, tokenizer, 512, None)
    ids, labels = np.array(example["input_ids"]), np.array(example["labels"])
    trained = tokenizer.decode(ids[labels != IGNORE_INDEX])
    context = tokenizer.decode(ids[labels == IGNORE_INDEX])
    assert '<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"}}</tool_call>' in trained
    assert "Yes: -3 degrees right now." in trained
    assert '{"celsius": -3}' in context and '{"celsius": -3}' not in trained  # the tool's answer: context only
    assert '"description": "The weather in a city now"' in context  # the schemas, from the template


def test_both_shapes_render_the_same_conversation(tokenizer):
    segments = record_segments(OPENAI, "auto", tokenizer)
    assert record_segments(SHAREGPT, "auto", tokenizer) == segments
    calls = [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}]
    assert "".join(text for text, _ in segments) == tokenizer.apply_chat_template(
        [OPENAI["messages"][0], {"role": "assistant", "content": "", "tool_calls": calls},
         OPENAI["messages"][2], OPENAI["messages"][3]], tools=OPENAI["tools"], tokenize=False)


def test_a_template_without_tool_support_names_the_setting(tokenizer):
    plain = load_tokenizer(ModelConfig(chat_template="{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n"
                                                     "{% endfor %}"))
    with pytest.raises(RecordError, match="does not render tools or tool_calls.*model.chat_template") as e:
        record_segments(OPENAI, "auto", plain)
    assert e.value.kind == "no_tool_template"


@pytest.mark.parametrize("turn, message", [
    ({"from": "function_call", "value": "{not json"}, "conversations\\[1\\]: not JSON"),
    ({"from": "function_call", "value": json.dumps({"arguments": {}})}, "needs a name"),
])
def test_broken_function_calls_say_why(tokenizer, turn, message):
    record = {**SHAREGPT, "conversations": [SHAREGPT["conversations"][0], turn, *SHAREGPT["conversations"][2:]]}
    with pytest.raises(RecordError, match=message) as e:
        record_segments(record, "auto", tokenizer)
    assert e.value.kind == "bad_tool_call"


def test_auto_says_the_records_carry_tool_calls(tmp_path):
    (tmp_path / "tools.jsonl").write_text("\n".join(json.dumps(r) for r in (OPENAI, SHAREGPT, OPENAI)) + "\n")
    fmt, note = choose_format(SourceConfig(path=str(tmp_path / "tools.jsonl")), StorageConfig(), "data.train")
    assert fmt == "chat" and note.endswith("3 with tool calls or schemas)")
