"""Record formats: detection, rendering, and which text is trainable."""

import json

import pytest

from ft_ray.config import ModelConfig
from ft_ray.data.formats import (RecordError, alpaca_prompt, detect_format, map_fields, record_segments, record_units,
                                 with_loss_on)
from ft_ray.data.records import parse_record
from ft_ray.data.tokenize import IGNORE_INDEX
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


def test_segments_records_train_where_labelled_as_written(tokenizer):
    """Axolotl's template-free input_output format: the text as written, trained where labelled."""
    record = {"segments": [{"text": "<s>Q: tent?\n", "label": False}, {"text": "A: Northwind.", "label": True},
                           {"text": "", "label": True}, {"text": "<|end|>", "label": True}]}
    assert detect_format(record) == "segments"
    assert record_segments(record, "auto", tokenizer) == [("<s>Q: tent?\n", False), ("A: Northwind.", True),
                                                          ("<|end|>", True)]
    for bad, reason, kind in [({"segments": []}, "must be a non-empty list", "wrong_type"),
                              ({"segments": [{"text": "x", "label": "yes"}]}, r"segments\[0\] must be", "wrong_type"),
                              ({"segments": [{"text": "x", "label": False}]}, "no segment with", "no_target_tokens")]:
        with pytest.raises(RecordError, match=reason) as caught:
            record_segments(bad, "segments", tokenizer)
        assert caught.value.kind == kind


def test_conversational_prompt_completion_renders_with_the_chat_template(tokenizer):
    """TRL's conversational prompt-completion: message lists, the completion one assistant turn."""
    prompt = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"}]
    segments = record_segments({"prompt": prompt, "completion": [{"role": "assistant", "content": "Hello."}]},
                               "auto", tokenizer)
    assert "".join(text for text, _ in segments) == tokenizer.apply_chat_template(
        [*prompt, {"role": "assistant", "content": "Hello."}], tokenize=False)
    assert [text for text, trained in segments if trained] == ["Hello.<|end|>\n"]


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


def test_a_template_that_opens_with_the_bos_token_gives_one_bos(tokenizer):
    """Llama 3's, Mistral's and Gemma's templates write the bos token first; ft-ray puts one
    before every example itself, so the template's is left out: [bos, <|user|>, ...], not
    [bos, bos, <|user|>, ...], in chat records, prompt/completion lists and preference pairs."""
    opening = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
    opening.chat_template = "{{ bos_token }}" + tokenizer.chat_template
    user, bos = tokenizer.convert_tokens_to_ids("<|user|>"), tokenizer.bos_token_id
    turns = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    for record, fmt in [({"messages": turns}, "chat"), ({"prompt": turns[:1], "completion": turns[1:]}, "completion")]:
        for template in (tokenizer, opening):
            example = parse_record(json.dumps(record), "", fmt, {}, template, 256, None)
            assert example["input_ids"][:2] == [bos, user]
    pair = {"prompt": turns[:1], "chosen": turns[1:], "rejected": [{"role": "assistant", "content": "no"}]}
    for segments, _ in record_units(pair, "preference", opening):  # chosen, rejected
        assert segments[0][0].startswith("<|user|>")


# as Qwen3's and DeepSeek-R1's templates do: an answer after the last user turn opens with its
# reasoning (here an empty one), which later renderings drop: no rendering begins with the one before
REASONING_TEMPLATE = (
    "{%- set last = namespace(user=-1) %}{%- for m in messages %}{%- if m.role == 'user' %}"
    "{%- set last.user = loop.index0 %}{%- endif %}{%- endfor %}"
    "{%- for m in messages %}{{ '<|' + m.role + '|>\n' }}"
    "{%- if m.role == 'assistant' and loop.index0 > last.user %}{{ '<think></think>' }}{%- endif %}"
    "{{ m.content + '<|end|>\n' }}{%- endfor %}{%- if add_generation_prompt %}{{ '<|assistant|>\n' }}{%- endif %}")


def test_a_template_that_drops_earlier_reasoning_trains_each_answer_as_the_whole_rendering_has_it(tokenizer):
    """Where the rendering of a conversation does not begin with the rendering of its turns
    before (the last answer's reasoning block), the conversation is rendered once and each
    assistant turn is the text from its header through the template's closing token: earlier
    answers as the full rendering has them (no reasoning), the last with its block; a weight-0
    turn stays prompt. Before, every multi-turn record of such a model was rejected."""
    from ft_ray.data.formats import turn_end

    reasoning = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
    reasoning.chat_template = REASONING_TEMPLATE
    assert turn_end(reasoning) == "<|end|>" and turn_end(tokenizer) == "<|end|>"
    messages = [{"role": "user", "content": "Tent size?"}, {"role": "assistant", "content": "Two people."},
                {"role": "user", "content": "Weight?"}, {"role": "assistant", "content": "Two kilos.", "weight": 0},
                {"role": "user", "content": "Colour?"}, {"role": "assistant", "content": "Green."}]
    segments = record_segments({"messages": messages}, "chat", reasoning)
    assert "".join(text for text, _ in segments) == reasoning.apply_chat_template(messages, tokenize=False)
    assert [text for text, trainable in segments if trainable] == ["Two people.<|end|>", "<think></think>Green.<|end|>"]
    assert ("Two kilos.<|end|>", False) in segments
    with pytest.raises(RecordError, match="growing prefix and its assistant turns are not found by their header") as caught:
        reasoning.chat_template = REASONING_TEMPLATE.replace("m.content + '<|end|>", "m.content + '")  # no closing
        record_segments({"messages": messages}, "chat", reasoning)
    assert caught.value.kind == "template_error"


@pytest.mark.parametrize("record, reason, kind", [
    ({"messages": [{"role": "robot", "content": "x"}]}, "unknown role 'robot'", "unknown_role"),
    ({"conversations": [{"from": "bot", "value": "x"}]}, "conversations\\[0\\].from: unknown role 'bot'", "unknown_role"),
    ({"messages": [{"role": "user", "content": "only a question"}]}, "no assistant message", "no_assistant"),
    ({"messages": []}, "non-empty list", "wrong_type"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x.png"}}]},
                   {"role": "assistant", "content": "A cat."}]}, "content\\[0\\]: a part of type 'image_url'",
     "wrong_type"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "weight": 0.5}]},
     "messages\\[1\\].weight must be 0 \\(not trained\\) or 1, got 0.5", "wrong_type"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "weight": 0}]},
     "no assistant message to learn from \\(each has weight 0\\)", "no_assistant"),
    ({"system": "Be brief.", "messages": [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "q"},
                                          {"role": "assistant", "content": "a"}]},
     "both a 'system' field and a system message \\(messages\\[0\\]\\): keep one", "conflicting_system"),
    ({"instruction": "do", "output": 3}, "field 'output' must be a string, got int", "wrong_type"),
    ({"instruction": "do", "output": "  "}, "field 'output' is empty", "empty_field"),
    ({"prompt": "p"}, "missing field 'completion'", "missing_field"),
    ({"instruction": "do it"}, "missing field 'output'", "missing_field"),
    (["not", "an", "object"], "expected a JSON object, got list", "not_object"),
    ({"body": "x"}, "cannot tell the format", "unknown_format"),
])
def test_bad_records_say_why(tokenizer, record, reason, kind):
    with pytest.raises(RecordError, match=reason) as caught:
        record_segments(record, "auto", tokenizer)
    assert caught.value.kind == kind


def test_openai_fine_tuning_files_content_parts_and_untrained_turns(tokenizer):
    """OpenAI's chat files: content as a list of text parts, `"weight": 0` on an assistant
    turn kept as context but not trained."""
    messages = first("chat")["messages"]
    parts = [{**m, "content": [{"type": "text", "text": m["content"][:3]}, {"type": "text", "text": m["content"][3:]}]}
             for m in messages]
    assert record_segments({"messages": parts}, "chat", tokenizer) == record_segments({"messages": messages}, "chat",
                                                                                      tokenizer)
    first_answer = next(i for i, m in enumerate(messages) if m["role"] == "assistant")
    weighted = [{**m, "weight": 0} if i == first_answer else m for i, m in enumerate(messages)]
    segments = record_segments({"messages": weighted}, "chat", tokenizer)
    assert "".join(text for text, _ in segments) == tokenizer.apply_chat_template(messages, tokenize=False)
    assert [text for text, trainable in segments if trainable] == ["Goodbye.<|end|>\n"]


def test_a_system_field_beside_the_turns_leads_them(tokenizer):
    messages = first("chat")["messages"]
    turns = [m for m in messages if m["role"] != "system"]
    led = [{"role": "system", "content": "Be brief."}, *turns]
    sharegpt = {"system": "Be brief.", "conversations": [{"from": {"user": "human", "assistant": "gpt"}[m["role"]],
                                                          "value": m["content"]} for m in turns]}
    assert record_segments(sharegpt, "auto", tokenizer) == record_segments({"messages": led}, "chat", tokenizer)
    assert record_segments({"system": " ", "messages": turns}, "chat", tokenizer) == record_segments(
        {"messages": turns}, "chat", tokenizer)  # an empty system column is no system message


def test_sharegpt_conversations_render_like_openai_messages(tokenizer):
    messages = first("chat")["messages"]
    names = {"system": "system", "user": "human", "assistant": "gpt"}
    sharegpt = {"conversations": [{"from": names[m["role"]], "value": m["content"]} for m in messages]}
    assert detect_format(sharegpt) == "chat"
    assert record_segments(sharegpt, "auto", tokenizer) == record_segments({"messages": messages}, "chat", tokenizer)


def test_instruction_system_field_leads_the_prompt(tokenizer):
    record = {"system": "You are terse.", "instruction": "Name a colour.", "output": "Red."}
    [(prompt, _), (output, _)] = record_segments(record, "instruction", tokenizer)
    assert prompt == "You are terse.\n\n" + alpaca_prompt("Name a colour.") and output == "Red.<|end|>"


def test_field_mapping_renames_columns_to_ours(tokenizer):
    record = map_fields({"question": "Name a colour.", "answer": "Red.", "id": 7},
                        {"instruction": "question", "output": "answer"})
    assert record == {"id": 7, "instruction": "Name a colour.", "output": "Red."}
    assert detect_format(record) == "instruction"


def test_forced_format_with_missing_field(tokenizer):
    with pytest.raises(RecordError, match="missing field 'completion'"):
        record_segments({"prompt": "p", "text": "t"}, "completion", tokenizer)


def trained_text(record, fmt, tokenizer, loss_on):
    example = parse_record(json.dumps(record), "", fmt, {}, tokenizer, 512, None, loss_on)
    return tokenizer.decode([i for i, label in zip(example["input_ids"], example["labels"]) if label != IGNORE_INDEX])


def test_loss_on_all_trains_prompts_too_and_last_answer_only_the_final_reply(tokenizer):
    """`data.loss_on`: the answers (default), every token (Axolotl's train_on_inputs, TRL's
    whole-conversation default), or a conversation's last assistant turn (mask_history)."""
    record = first("chat")
    rendered = tokenizer.apply_chat_template(record["messages"], tokenize=False)
    assert trained_text(record, "chat", tokenizer, "answers") == "Hello.<|end|>\nGoodbye.<|end|>\n"
    assert trained_text(record, "chat", tokenizer, "last_answer") == "Goodbye.<|end|>\n"
    assert trained_text(record, "chat", tokenizer, "all") == rendered  # all but the bos, which predicts nothing
    instruction = json.loads((ASSETS / "instruction.jsonl").read_text().splitlines()[1])
    assert trained_text(instruction, "instruction", tokenizer, "all") == (
        alpaca_prompt("Translate to French.", "tent") + "tente<|end|>")
    assert trained_text(instruction, "instruction", tokenizer, "last_answer") == "tente<|end|>"
    pair = {"prompt": "Name a tent.", "chosen": " Northwind.", "rejected": " A bag."}
    assert with_loss_on(record_units(pair, "preference", tokenizer), "all") == record_units(pair, "preference", tokenizer)
