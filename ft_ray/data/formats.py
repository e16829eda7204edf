"""Record formats: what a training example looks like on disk, and which of its text is
learned from.

Every format turns a record into *segments*: `(text, trainable)` pairs in reading order.
Prompt text (instructions, user turns, prompts) is context only; the model is trained on
the response text. Tokenization (`ft_ray.data.tokenize`) turns segments into ids and labels.
"""

from __future__ import annotations

from typing import Any, Callable

FORMATS = ("text", "instruction", "chat", "completion")
# Every field a format reads (before data.fields maps them): Parquet reads only these columns.
RECORD_FIELDS = ("text", "instruction", "input", "output", "system", "prompt", "completion", "messages",
                 "conversations")
CHAT_ROLES = ("system", "user", "assistant")

Segments = list[tuple[str, bool]]


class RecordError(ValueError):
    """One record that cannot be used: `kind` is the reason counted in the summary
    (e.g. missing_field), the message the detail written next to the record."""

    def __init__(self, message: str, kind: str = "bad_record"):
        super().__init__(message)
        self.kind = kind


SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant",
                  "assistant": "assistant", "chatgpt": "assistant", "model": "assistant"}


def detect_format(record: Any) -> str:
    """The format a record's keys point to.

    Raises:
        RecordError: when the keys match no known format.
    """
    if not isinstance(record, dict):
        raise RecordError(f"expected a JSON object, got {type(record).__name__}", "not_object")
    keys = set(record)
    if "messages" in keys or "conversations" in keys:
        return "chat"
    if "instruction" in keys:  # a missing output is then reported as such
        return "instruction"
    if "prompt" in keys:
        return "completion"
    if "text" in keys:
        return "text"
    raise RecordError(f"cannot tell the format from keys {sorted(keys)}: expected text, "
                      "instruction/output, prompt/completion, messages or conversations "
                      "(or map your columns with data.fields)", "unknown_format")


def map_fields(record: Any, fields: dict[str, str]) -> Any:
    """The record with its columns renamed to ft-ray's names (`fields`: ours -> theirs)."""
    if not fields or not isinstance(record, dict):
        return record
    mapped = {k: v for k, v in record.items() if k not in fields.values()}
    for ours, theirs in fields.items():
        if theirs in record:
            mapped[ours] = record[theirs]
    return mapped


def alpaca_prompt(instruction: str, input_text: str = "") -> str:
    """The Alpaca prompt, the de-facto standard for instruction records."""
    if input_text:
        return f"### Instruction:\n{instruction}\n\n### Input:\n{input_text}\n\n### Response:\n"
    return f"### Instruction:\n{instruction}\n\n### Response:\n"


def _field(record: dict, name: str, required: bool = True) -> str:
    value = record.get(name)
    if value is None:
        if required:
            raise RecordError(f"missing field '{name}'", "missing_field")
        return ""
    if not isinstance(value, str):
        raise RecordError(f"field '{name}' must be a string, got {type(value).__name__}", "wrong_type")
    return value


def _non_empty(text: str, name: str) -> str:
    if not text.strip():
        raise RecordError(f"field '{name}' is empty", "empty_field")
    return text


def text_segments(record: dict, tokenizer: Any = None) -> Segments:
    return [(_non_empty(_field(record, "text"), "text") + _eos(tokenizer), True)]


def instruction_segments(record: dict, tokenizer: Any = None) -> Segments:
    prompt = alpaca_prompt(_non_empty(_field(record, "instruction"), "instruction"),
                           _field(record, "input", required=False))
    system = _field(record, "system", required=False)
    if system.strip():
        prompt = f"{system}\n\n{prompt}"
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
        raise RecordError("conversation has no assistant message to learn from", "no_assistant")
    return [(text, trainable) for text, trainable in segments if text]


def _messages(record: dict) -> list[dict]:
    """OpenAI `messages` (role/content) or ShareGPT `conversations` (from/value), as role/content."""
    key, role_key, text_key = (("messages", "role", "content") if "messages" in record
                               else ("conversations", "from", "value"))
    messages = record.get(key)
    if messages is None:
        raise RecordError("missing field 'messages' (or ShareGPT 'conversations')", "missing_field")
    if not isinstance(messages, list) or not messages:
        raise RecordError(f"field '{key}' must be a non-empty list", "wrong_type")
    turns = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise RecordError(f"{key}[{i}] must be an object with {role_key} and {text_key}", "wrong_type")
        role, content = message.get(role_key), message.get(text_key)
        role = role if key == "messages" else SHAREGPT_ROLES.get(role, role)
        if role not in CHAT_ROLES:
            allowed = ", ".join(CHAT_ROLES if key == "messages" else SHAREGPT_ROLES)
            raise RecordError(f"{key}[{i}].{role_key}: unknown role {role!r} (allowed: {allowed})", "unknown_role")
        if not isinstance(content, str):
            raise RecordError(f"{key}[{i}].{text_key} must be a string", "wrong_type")
        if not content.strip():
            raise RecordError(f"{key}[{i}].{text_key} is empty", "empty_field")
        turns.append({"role": role, "content": content})
    return turns


def _render(tokenizer: Any, messages: list[dict], generation_prompt: bool) -> str:
    if not messages and not generation_prompt:
        return ""
    if getattr(tokenizer, "chat_template", None) is None:
        raise RecordError("chat records need a tokenizer with a chat template", "no_chat_template")
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    except Exception as e:  # noqa: BLE001 - jinja's TemplateError and what a template's own checks raise
        raise RecordError(f"the chat template refused it: {type(e).__name__}: {str(e)[:300]}",
                          "template_error") from None


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
        raise RecordError(f"expected a JSON object, got {type(record).__name__}", "not_object")
    chosen = detect_format(record) if fmt == "auto" else fmt
    return SEGMENTERS[chosen](record, tokenizer)
