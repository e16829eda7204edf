"""Record formats: what a training example looks like on disk, and which of its text is
learned from.

Every format turns a record into *segments*: `(text, trainable)` pairs in reading order.
Prompt text (instructions, user turns, prompts) is context only; the model is trained on
the response text. Tokenization (`ft_ray.data.tokenize`) turns segments into ids and labels.
"""

from __future__ import annotations

from typing import Any, Callable

FORMATS = ("text", "instruction", "chat", "completion")
CHAT_ROLES = ("system", "user", "assistant")

Segments = list[tuple[str, bool]]


class RecordError(ValueError):
    """One record that cannot be used; the message says why (it becomes a reject reason)."""


def detect_format(record: Any) -> str:
    """The format a record's keys point to.

    Raises:
        RecordError: when the keys match no known format.
    """
    if not isinstance(record, dict):
        raise RecordError(f"expected a JSON object, got {type(record).__name__}")
    keys = set(record)
    if "messages" in keys:
        return "chat"
    if "instruction" in keys:  # a missing output is then reported as such
        return "instruction"
    if "prompt" in keys:
        return "completion"
    if "text" in keys:
        return "text"
    raise RecordError(f"cannot tell the format from keys {sorted(keys)}: expected text, "
                      "instruction/output, prompt/completion or messages")


def alpaca_prompt(instruction: str, input_text: str = "") -> str:
    """The Alpaca prompt, the de-facto standard for instruction records."""
    if input_text:
        return f"### Instruction:\n{instruction}\n\n### Input:\n{input_text}\n\n### Response:\n"
    return f"### Instruction:\n{instruction}\n\n### Response:\n"


def _field(record: dict, name: str, required: bool = True) -> str:
    value = record.get(name)
    if value is None:
        if required:
            raise RecordError(f"missing field '{name}'")
        return ""
    if not isinstance(value, str):
        raise RecordError(f"field '{name}' must be a string, got {type(value).__name__}")
    return value


def _non_empty(text: str, name: str) -> str:
    if not text.strip():
        raise RecordError(f"field '{name}' is empty")
    return text


def text_segments(record: dict, tokenizer: Any = None) -> Segments:
    return [(_non_empty(_field(record, "text"), "text") + _eos(tokenizer), True)]


def instruction_segments(record: dict, tokenizer: Any = None) -> Segments:
    prompt = alpaca_prompt(_non_empty(_field(record, "instruction"), "instruction"),
                           _field(record, "input", required=False))
    output = _non_empty(_field(record, "output"), "output")
    return [(prompt, False), (output + _eos(tokenizer), True)]


def completion_segments(record: dict, tokenizer: Any = None) -> Segments:
    prompt = _non_empty(_field(record, "prompt"), "prompt")
    completion = _non_empty(_field(record, "completion"), "completion")
    return [(prompt, False), (completion + _eos(tokenizer), True)]


def chat_segments(record: dict, tokenizer: Any) -> Segments:
    """Render messages with the tokenizer's chat template; assistant replies are trainable.

    Each turn's text is the difference between rendering the conversation up to and
    including that turn and rendering it up to the turn before, so the result is exactly
    the template's output. The assistant header (the generation prompt) stays masked.
    """
    messages = _messages(record)
    segments: Segments = []
    rendered = ""
    for i, message in enumerate(messages):
        if message["role"] == "assistant":
            header = _render(tokenizer, messages[:i], generation_prompt=True)
            segments.append((_suffix(header, rendered), False))
            rendered = header
        full = _render(tokenizer, messages[: i + 1], generation_prompt=False)
        segments.append((_suffix(full, rendered), message["role"] == "assistant"))
        rendered = full
    if not any(trainable for _, trainable in segments):
        raise RecordError("conversation has no assistant message to learn from")
    return [(text, trainable) for text, trainable in segments if text]


def _messages(record: dict) -> list[dict]:
    messages = record.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RecordError("field 'messages' must be a non-empty list")
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise RecordError(f"messages[{i}] must be an object with role and content")
        role, content = message.get("role"), message.get("content")
        if role not in CHAT_ROLES:
            raise RecordError(f"messages[{i}].role: unknown role {role!r} (allowed: {', '.join(CHAT_ROLES)})")
        if not isinstance(content, str) or not content.strip():
            raise RecordError(f"messages[{i}].content must be a non-empty string")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def _render(tokenizer: Any, messages: list[dict], generation_prompt: bool) -> str:
    if not messages and not generation_prompt:
        return ""
    if getattr(tokenizer, "chat_template", None) is None:
        raise RecordError("chat records need a tokenizer with a chat template")
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def _suffix(text: str, prefix: str) -> str:
    if not text.startswith(prefix):
        raise RecordError("the chat template does not render turns as a growing prefix; "
                          "cannot mask prompt turns for this tokenizer")
    return text[len(prefix):]


def _eos(tokenizer: Any) -> str:
    return getattr(tokenizer, "eos_token", None) or ""


SEGMENTERS: dict[str, Callable[[dict, Any], Segments]] = {
    "text": text_segments,
    "instruction": instruction_segments,
    "chat": chat_segments,
    "completion": completion_segments,
}


def record_segments(record: Any, fmt: str, tokenizer: Any) -> Segments:
    """Segments of one record in format `fmt` ("auto" detects it per record).

    Raises:
        RecordError: the record is malformed for the format.
    """
    if not isinstance(record, dict):
        raise RecordError(f"expected a JSON object, got {type(record).__name__}")
    chosen = detect_format(record) if fmt == "auto" else fmt
    return SEGMENTERS[chosen](record, tokenizer)
