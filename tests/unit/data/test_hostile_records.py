"""One record's failure, whatever raises it, rejects that record with a reason and never its
neighbours: parsing (deep nesting), rendering (a chat template that refuses), tokenizing (text
no tokenizer takes)."""

from __future__ import annotations

import copy
import json

import pytest

from ft_ray.config import ModelConfig
from ft_ray.data.formats import RecordError
from ft_ray.data.records import tokenize_batch
from ft_ray.models import load_tokenizer

GOOD = json.dumps({"instruction": "Say hi.", "output": "Hi there."})
CHAT = {"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"},
                     {"role": "assistant", "content": "c"}]}


@pytest.fixture(scope="module")
def strict_tokenizer():
    """The built-in tokenizer with a template that demands alternating roles (as Llama 2's does)."""
    tokenizer = copy.deepcopy(load_tokenizer(ModelConfig()))
    tokenizer.chat_template = (
        "{% for m in messages %}{% if loop.index0 > 0 and m['role'] == messages[loop.index0 - 1]['role'] %}"
        "{{ raise_exception('Conversation roles must alternate') }}{% endif %}"
        "<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")
    return tokenizer


def reasons(texts: list[str], tokenizer, fmt: str = "auto") -> list[str | None]:
    out = tokenize_batch(texts, [""] * len(texts), fmt, {}, tokenizer, 128, None)
    return [o.kind if isinstance(o, RecordError) else None for o in out]


def test_deep_nesting_is_too_deep_not_a_crash(strict_tokenizer):
    deep = '{"instruction": "x", "output": ' + "[" * 100_000 + "]" * 100_000 + "}"
    assert reasons([GOOD, deep, GOOD], strict_tokenizer) == [None, "too_deep", None]


def test_a_template_that_raises_is_a_template_error(strict_tokenizer):
    alternating = {"messages": [CHAT["messages"][0], CHAT["messages"][2]]}
    assert reasons([json.dumps(CHAT), json.dumps(alternating)], strict_tokenizer, "chat") == ["template_error", None]


def test_a_lone_surrogate_is_rejected_and_its_neighbours_tokenized(strict_tokenizer):
    surrogate = '{"instruction": "x", "output": "bad \\ud800 text"}'
    out = tokenize_batch([GOOD, surrogate, GOOD], [""] * 3, "auto", {}, strict_tokenizer, 128, None)
    assert isinstance(out[1], RecordError) and out[1].kind == "bad_unicode"
    assert out[0] == out[2] and len(out[0]["input_ids"]) > 3
