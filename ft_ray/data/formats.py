"""Record formats: what a training example looks like on disk, and which of its text is
learned from.

Every format turns a record into *segments*: `(text, trainable)` pairs in reading order.
Prompt text (instructions, user turns, prompts) is context only; the model is trained on
the response text. Tokenization (`ft_ray.data.tokenize`) turns segments into ids and labels.

Preference formats turn a record into *units*: one or two sequences, each with a role.
`preference` (a prompt with a better and a worse answer, for DPO and ORPO) gives the prompt +
chosen answer (role CHOSEN) and the prompt + rejected answer (role REJECTED); `kto` (one
answer marked good or bad) gives the prompt + answer, CHOSEN when good, REJECTED when bad.
The trainable segment of each is the answer alone.
"""

from __future__ import annotations

import json
from typing import Any, Callable

FORMATS = ("text", "instruction", "chat", "completion", "segments", "preference", "kto")
PREFERENCE_FORMATS = ("preference", "kto")
# Every field a format reads (before data.fields maps them): Parquet reads only these columns.
RECORD_FIELDS = ("text", "instruction", "input", "output", "system", "prompt", "completion", "messages",
                 "conversations", "segments", "chosen", "rejected", "label", "tools")
CHAT_ROLES = ("system", "user", "assistant", "tool")

Segments = list[tuple[str, bool]]
SFT, CHOSEN, REJECTED = 0, 1, 2  # a unit's role: plain example; chosen (good) answer; rejected (bad) answer
Units = list[tuple[Segments, int]]


class RecordError(ValueError):
    """One record that cannot be used: `kind` is the reason counted in the summary
    (e.g. missing_field), the message the detail written next to the record."""

    def __init__(self, message: str, kind: str = "bad_record"):
        super().__init__(message)
        self.kind = kind


SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant",
                  "assistant": "assistant", "chatgpt": "assistant", "model": "assistant",
                  "function_call": "assistant", "observation": "tool", "tool": "tool"}


def detect_format(record: Any) -> str:
    """The format a record's keys point to.

    Raises:
        RecordError: when the keys match no known format.
    """
    if not isinstance(record, dict):
        raise RecordError(f"expected a JSON object, got {type(record).__name__}", "not_object")
    keys = set(record)
    if "chosen" in keys or "rejected" in keys:
        return "preference"
    if "label" in keys:
        return "kto"
    if "messages" in keys or "conversations" in keys:
        return "chat"
    if "segments" in keys:
        return "segments"
    if "instruction" in keys:  # a missing output is then reported as such
        return "instruction"
    if "prompt" in keys:
        return "completion"
    if "text" in keys:
        return "text"
    raise RecordError(f"cannot tell the format from keys {sorted(keys)}: expected text, "
                      "instruction/output, prompt/completion, messages or conversations, segments, chosen/rejected "
                      "(preference) "
                      "or label (kto) "
                      "(or map your columns with data.fields)", "unknown_format")


TOOL_TURNS = ("tool", "function_call", "observation")


def uses_tools(record: dict) -> bool:
    """Whether a chat record carries function schemas, calls or results (said when `auto` picks chat)."""
    turns = record.get("messages") or record.get("conversations") or []
    return bool(record.get("tools")) or any(
        isinstance(t, dict) and (t.get("tool_calls") or t.get("role", t.get("from")) in TOOL_TURNS)
        for t in (turns if isinstance(turns, list) else []))


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
    prompt = _alpaca_prompt_of(record)
    output = _non_empty(_field(record, "output"), "output")
    return [(prompt, False), (output + _eos(tokenizer), True)]


def completion_segments(record: dict, tokenizer: Any = None) -> Segments:
    """`{prompt, completion}`: strings (the prompt as written), or TRL's conversational form,
    message lists rendered by the chat template (the completion one assistant message)."""
    for name in ("prompt", "completion"):
        if record.get(name) is None:
            raise RecordError(f"missing field '{name}'", "missing_field")
    return _prompt_answer(record["prompt"], record["completion"], "completion", tokenizer)


def template_free_segments(record: dict, tokenizer: Any = None) -> Segments:
    """Axolotl's template-free `input_output` records: `{"segments": [{"text", "label"}]}`, the
    text as written, in order, trained where `label` is true (no eos is added: write it)."""
    parts = record.get("segments")
    if parts is None:
        raise RecordError("missing field 'segments'", "missing_field")
    if not isinstance(parts, list) or not parts:
        raise RecordError("field 'segments' must be a non-empty list of {text, label}", "wrong_type")
    segments: Segments = []
    for i, part in enumerate(parts):
        if not isinstance(part, dict) or not isinstance(part.get("text"), str) or not isinstance(part.get("label"), bool):
            raise RecordError(f"segments[{i}] must be {{\"text\": string, \"label\": true|false}}, got "
                              f"{json.dumps(part)[:80]}", "wrong_type")
        segments.append((part["text"], part["label"]))
    if not any(trained and text.strip() for text, trained in segments):
        raise RecordError("no segment with \"label\": true and text to learn from", "no_target_tokens")
    return [(text, trained) for text, trained in segments if text]


def chat_segments(record: dict, tokenizer: Any) -> Segments:
    """Render messages with the tokenizer's chat template; assistant replies are trainable,
    their function calls included, unless marked `"weight": 0` (OpenAI's fine-tuning files);
    tool results never are.

    Each turn's text is the difference between rendering the conversation up to and
    including that turn and rendering it up to the turn before, so the result is exactly
    the template's output. The assistant header (the generation prompt) stays masked.
    The record's `tools` (function schemas: a list, or a JSON string of one) are given to
    the template (`apply_chat_template(..., tools=...)`).
    """
    messages, tools = _messages(record), _tools(record)
    if tools or any("tool_calls" in m for m in messages):
        _check_tool_support(tokenizer, tools)
    if not any(m["role"] == "assistant" and m.get("weight", 1) == 1 for m in messages):
        weighted = any(m["role"] == "assistant" for m in messages)
        raise RecordError("conversation has no assistant message to learn from"
                          + (" (each has weight 0)" if weighted else ""), "no_assistant")
    try:
        segments = _growing_segments(messages, tokenizer, tools)
    except NotAPrefix:
        segments = _marked_segments(messages, tokenizer, tools)
    return [(text, trainable) for text, trainable in segments if text]


class NotAPrefix(RecordError):
    """A chat template's rendering of a conversation does not begin with its rendering of
    the turns before (Qwen3's and DeepSeek-R1's drop the reasoning of earlier answers)."""

    def __init__(self, searched: bool = False) -> None:
        super().__init__("the chat template does not render this conversation's turns as a growing prefix"
                         + (" and its assistant turns are not found by their header and closing token" if searched
                            else "") + ": cannot mask the prompt turns", "template_error")


def _growing_segments(messages: list[dict], tokenizer: Any, tools: list[dict] | None) -> Segments:
    """Each turn as the difference between the rendering up to it and up to the turn before."""
    segments: Segments = []
    rendered = ""
    for i, message in enumerate(messages):
        if message["role"] == "assistant":
            header = _render(tokenizer, messages[:i], generation_prompt=True, tools=tools)
            segments.append((_suffix(header, rendered), False))
            rendered = header
        full = _render(tokenizer, messages[: i + 1], generation_prompt=False, tools=tools)
        segments.append((_suffix(full, rendered), message["role"] == "assistant" and message.get("weight", 1) == 1))
        rendered = full
    return segments


def _marked_segments(messages: list[dict], tokenizer: Any, tools: list[dict] | None) -> Segments:
    """For a template whose renderings do not grow (`NotAPrefix`): the whole conversation
    rendered once, each assistant turn found in it as the text from its header (what the
    generation prompt adds: `<|im_start|>assistant\n`) through the special token the template
    closes a turn with (`turn_end`), the headers in order, one per assistant message."""
    first = next(i for i, m in enumerate(messages) if m["role"] == "assistant")
    before = _render(tokenizer, messages[:first], generation_prompt=False, tools=tools)
    prompted = _render(tokenizer, messages[:first], generation_prompt=True, tools=tools)
    header, closing = prompted[len(before):], turn_end(tokenizer)
    full = _render(tokenizer, messages, generation_prompt=False, tools=tools)
    answers = [m for m in messages if m["role"] == "assistant"]
    if not prompted.startswith(before) or not header or not closing or full.count(header) != len(answers):
        raise NotAPrefix(searched=True)
    segments: Segments = []
    cursor = 0
    for message in answers:
        start = full.index(header, cursor) + len(header)
        end = full.find(closing, start)
        if end < 0:
            raise NotAPrefix(searched=True)
        end += len(closing)
        segments += [(full[cursor:start], False), (full[start:end], message.get("weight", 1) == 1)]
        cursor = end
    return segments + [(full[cursor:], False)]


ANSWER_PROBE = "Okay, done."  # an assistant turn's text, found in the template's rendering of it


def turn_end(tokenizer: Any) -> str | None:
    """The special token the chat template closes an assistant turn with (`<|im_end|>`,
    `<|eot_id|>`, `<end_of_turn>`; the built-in model's `<|end|>`), as text: the first
    special token after the turn's text in the rendering of a probe; None where there is
    none or no template."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    try:
        text = tokenizer.apply_chat_template([{"role": "user", "content": "Hi."},
                                              {"role": "assistant", "content": ANSWER_PROBE}], tokenize=False)
    except Exception:  # noqa: BLE001 - a template that refuses the probe
        return None
    if ANSWER_PROBE not in text:
        return None
    special = {*tokenizer.all_special_ids, *tokenizer.added_tokens_decoder}
    after = tokenizer(text[text.rindex(ANSWER_PROBE) + len(ANSWER_PROBE):], add_special_tokens=False)["input_ids"]
    closing = next((i for i in after if i in special), None)
    return None if closing is None else tokenizer.convert_ids_to_tokens(closing)


REASONING_END = "</think>"  # Qwen3's, QwQ's and DeepSeek-R1's templates close the reasoning with it


def reasoning_end(tokenizer: Any) -> str | None:
    """The text that closes a reasoning block before the answer ("</think>") where the chat
    template writes one (Qwen3's hybrid template writes an empty one before every answer
    trained without reasoning), else None."""
    return REASONING_END if REASONING_END in (getattr(tokenizer, "chat_template", None) or "") else None


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
        given, content = message.get(role_key), message.get(text_key)
        role = given if key == "messages" else SHAREGPT_ROLES.get(given, given)
        if role not in CHAT_ROLES:
            allowed = ", ".join(CHAT_ROLES if key == "messages" else SHAREGPT_ROLES)
            raise RecordError(f"{key}[{i}].{role_key}: unknown role {role!r} (allowed: {allowed})", "unknown_role")
        where = f"{key}[{i}]"
        if given == "function_call":  # ShareGPT: the call as JSON text {"name", "arguments"} (or a list of them)
            turns.append({"role": "assistant", "content": "", "tool_calls": _tool_calls(_json_of(content, where), where)})
            continue
        calls = message.get("tool_calls") if key == "messages" and role == "assistant" else None
        if calls is not None:  # OpenAI: the content may be empty or null beside the calls
            turns.append({"role": role, "content": content or "", "tool_calls": _tool_calls(calls, f"{where}.tool_calls")})
            continue
        if isinstance(content, list) and key == "messages":
            content = _text_parts(content, f"{where}.{text_key}")
        if not isinstance(content, str):
            raise RecordError(f"{where}.{text_key} must be a string (or a list of text parts)", "wrong_type")
        if not content.strip() and role != "tool":  # a tool may well return nothing
            raise RecordError(f"{where}.{text_key} is empty", "empty_field")
        turn = {"role": role, "content": content}
        turn.update({k: message[k] for k in ("name", "tool_call_id") if role == "tool" and isinstance(message.get(k), str)})
        if role == "assistant" and "weight" in message and key == "messages":
            if message["weight"] not in (0, 1):
                raise RecordError(f"{where}.weight must be 0 (not trained) or 1, got {message['weight']!r}", "wrong_type")
            turn["weight"] = int(message["weight"])
        turns.append(turn)
    return _with_system_field(record, turns, key)


def _with_system_field(record: dict, turns: list[dict], key: str) -> list[dict]:
    """The turns led by the record's own `system` field (ShareGPT exports, LLaMA-Factory's
    `system` column) as a system message; an empty one is none."""
    system = record.get("system")
    if system is None or (isinstance(system, str) and not system.strip()):
        return turns
    if not isinstance(system, str):
        raise RecordError(f"field 'system' must be a string, got {type(system).__name__}", "wrong_type")
    if turns[0]["role"] == "system":
        raise RecordError(f"both a 'system' field and a system message ({key}[0]): keep one", "conflicting_system")
    return [{"role": "system", "content": system}, *turns]


def _text_parts(parts: list, where: str) -> str:
    """OpenAI content parts (`[{"type": "text", "text": ...}, ...]`) as one text."""
    texts = []
    for j, part in enumerate(parts):
        kind = part.get("type") if isinstance(part, dict) else type(part).__name__
        if kind != "text" or not isinstance(part.get("text"), str):
            raise RecordError(f"{where}[{j}]: a part of type {kind!r}; ft-ray trains on text parts only "
                              "({'type': 'text', 'text': ...})", "wrong_type")
        texts.append(part["text"])
    return "".join(texts)


def _json_of(value: Any, where: str) -> Any:
    """A JSON text's value (a value that is not text is taken as it is)."""
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except json.JSONDecodeError as e:
        raise RecordError(f"{where}: not JSON: {e.msg} at column {e.colno}", "bad_tool_call") from None


def _tool_calls(calls: Any, where: str) -> list[dict]:
    """Function calls as chat templates take them: [{"type": "function", "function": {"name",
    "arguments" (an object)}}], from OpenAI's shape (arguments as JSON text) or bare
    {"name", "arguments"} objects (ShareGPT)."""
    calls = calls if isinstance(calls, list) else [calls]
    if not calls:
        raise RecordError(f"{where}: no function call", "bad_tool_call")
    out = []
    for n, call in enumerate(calls):
        function = call.get("function", call) if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str) or not function["name"]:
            raise RecordError(f"{where}[{n}]: a function call needs a name (and arguments)", "bad_tool_call")
        arguments = _json_of(function.get("arguments", {}), f"{where}[{n}].arguments")
        entry = {"type": "function", "function": {"name": function["name"], "arguments": arguments}}
        if isinstance(call.get("id"), str):
            entry["id"] = call["id"]
        out.append(entry)
    return out


def _tools(record: dict) -> list[dict] | None:
    """A record's function schemas, as templates take them ({"type": "function", "function": ...}),
    or None."""
    tools = _json_of(record.get("tools"), "tools") if record.get("tools") not in (None, "", []) else None
    if tools is None:
        return None
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise RecordError("field 'tools' must be a list of function schemas (or JSON text of one)", "wrong_type")
    return [t if "function" in t else {"type": "function", "function": t} for t in tools]


def _check_tool_support(tokenizer: Any, tools: list[dict] | None) -> None:
    template = getattr(tokenizer, "chat_template", None) or ""
    missing = [what for what, needed in (("tools", tools), ("tool_calls", True)) if needed and what not in template]
    if missing:
        raise RecordError(f"the tokenizer's chat template does not render {' or '.join(missing)}, so the record's "
                          "function calls would be lost; set model.chat_template to a template with tool "
                          "support (e.g. the instruct model's own)", "no_tool_template")


def _render(tokenizer: Any, messages: list[dict], generation_prompt: bool, tools: list[dict] | None = None) -> str:
    """The chat template's text of `messages`, without the bos token the template may open
    with (Llama 3, Mistral and Gemma's do): every example gets its bos from ft-ray
    (`assemble_batch`), and a second one would train the model on [bos, bos, ...]."""
    if not messages and not generation_prompt and not tools:
        return ""
    if getattr(tokenizer, "chat_template", None) is None:
        raise RecordError("chat records need a tokenizer with a chat template", "no_chat_template")
    try:
        text = tokenizer.apply_chat_template(messages, tools=tools, tokenize=False,
                                             add_generation_prompt=generation_prompt)
    except Exception as e:  # noqa: BLE001 - jinja's TemplateError and what a template's own checks raise
        raise RecordError(f"the chat template refused it: {type(e).__name__}: {str(e)[:300]}",
                          "template_error") from None
    bos = tokenizer.bos_token if tokenizer.bos_token_id is not None else None
    return text[len(bos):] if bos and text.startswith(bos) else text


def _suffix(text: str, prefix: str) -> str:
    if not text.startswith(prefix):
        raise NotAPrefix()
    return text[len(prefix):]


def _eos(tokenizer: Any) -> str:
    return getattr(tokenizer, "eos_token", None) or ""


SEGMENTERS: dict[str, Callable[[dict, Any], Segments]] = {
    "text": text_segments,
    "instruction": instruction_segments,
    "chat": chat_segments,
    "completion": completion_segments,
    "segments": template_free_segments,
}


def record_units(record: Any, fmt: str, tokenizer: Any) -> Units:
    """The units of one record in format `fmt` ("auto" detects it per record): one SFT unit
    for the supervised formats, (chosen, rejected) for `preference`, one judged answer for `kto`.

    Raises:
        RecordError: the record is malformed for the format.
    """
    if not isinstance(record, dict):
        raise RecordError(f"expected a JSON object, got {type(record).__name__}", "not_object")
    chosen = detect_format(record) if fmt == "auto" else fmt
    if chosen == "preference":
        return preference_units(record, tokenizer)
    if chosen == "kto":
        return [kto_unit(record, tokenizer)]
    return [(SEGMENTERS[chosen](record, tokenizer), SFT)]


def with_loss_on(units: Units, loss_on: str) -> Units:
    """The units with `data.loss_on` applied to the supervised ones: `answers` as the format
    marks them; `all` every segment (prompts, user and system turns, tool results: TRL's
    default for conversations, Axolotl's `train_on_inputs`); `last_answer` the last trained
    segment alone (a conversation's final assistant reply; the earlier replies become context,
    LLaMA-Factory's `mask_history`). Preference units keep their answers as the only trained text."""
    if loss_on == "answers":
        return units
    out: Units = []
    for segments, role in units:
        if role == SFT and loss_on == "all":
            segments = [(text, True) for text, _ in segments]
        elif role == SFT:
            last = max(i for i, (_, trainable) in enumerate(segments) if trainable)
            segments = [(text, i == last) for i, (text, _) in enumerate(segments)]
        out.append((segments, role))
    return out


def record_segments(record: Any, fmt: str, tokenizer: Any) -> Segments:
    """Segments of one record in format `fmt`: for a preference pair, the prompt and its chosen
    answer (what prompting arms and generation metrics use as the reference).

    Raises:
        RecordError: the record is malformed for the format.
    """
    return record_units(record, fmt, tokenizer)[0][0]


# ---------------------------------------------------------------- preference formats


def preference_units(record: dict, tokenizer: Any) -> Units:
    """(prompt + chosen, CHOSEN), (prompt + rejected, REJECTED) of one pair, in any of the
    shapes: TRL's `{prompt, chosen, rejected}` (strings, or message lists), ShareGPT's
    `{conversations, chosen: {from, value}, rejected: {...}}`, Alpaca's `{instruction, input,
    chosen, rejected}`, and whole transcripts `{chosen, rejected}` that share a prompt prefix
    (Anthropic HH)."""
    for name in ("chosen", "rejected"):
        if record.get(name) is None:
            raise RecordError(f"missing field '{name}' (a preference pair needs chosen and rejected)",
                              "missing_field")
    chosen, rejected = record["chosen"], record["rejected"]
    if "conversations" in record or "messages" in record:
        prompt = _messages(record)
        answers = [_answer_message(value, name, "conversations" in record) for value, name in
                   ((chosen, "chosen"), (rejected, "rejected"))]
        units = [_chat_answer(prompt, answer, tokenizer) for answer in answers]
    elif "instruction" in record:
        prompt = _alpaca_prompt_of(record)
        units = [[(prompt, False), (_answer_text(value, name) + _eos(tokenizer), True)]
                 for value, name in ((chosen, "chosen"), (rejected, "rejected"))]
    elif "prompt" in record:
        units = [_prompt_answer(record["prompt"], value, name, tokenizer)
                 for value, name in ((chosen, "chosen"), (rejected, "rejected"))]
    else:
        units = _shared_prefix_units(chosen, rejected, tokenizer)
    if units[0][-1][0] == units[1][-1][0]:
        raise RecordError("chosen and rejected are the same answer", "identical_pair")
    return [(units[0], CHOSEN), (units[1], REJECTED)]


def kto_unit(record: dict, tokenizer: Any) -> tuple[Segments, int]:
    """(prompt + answer, CHOSEN or REJECTED) of one judged answer: `{prompt, completion,
    label}` (strings or message lists) or a chat `{messages, label}` whose last assistant
    turn is the judged answer (earlier turns are context only)."""
    label = record.get("label")
    if label is None:
        raise RecordError("missing field 'label' (true: a good answer, false: a bad one)", "missing_field")
    if isinstance(label, str) and label.strip().lower() in ("true", "false"):
        label = label.strip().lower() == "true"  # a CSV / TSV cell
    if not isinstance(label, bool):
        raise RecordError(f"field 'label' must be true or false, got {label!r}", "wrong_type")
    role = CHOSEN if label else REJECTED
    if "messages" in record or "conversations" in record:
        messages = _messages(record)
        if messages[-1]["role"] != "assistant":
            raise RecordError("the last message must be the assistant's answer that 'label' judges", "no_assistant")
        return _chat_answer(messages[:-1], messages[-1], tokenizer), role
    if record.get("completion") is None:
        raise RecordError("missing field 'completion' (the judged answer)", "missing_field")
    return _prompt_answer(record.get("prompt"), record["completion"], "completion", tokenizer), role


def _alpaca_prompt_of(record: dict) -> str:
    prompt = alpaca_prompt(_non_empty(_field(record, "instruction"), "instruction"),
                           _field(record, "input", required=False))
    system = _field(record, "system", required=False)
    return f"{system}\n\n{prompt}" if system.strip() else prompt


def _answer_text(value: Any, name: str) -> str:
    if not isinstance(value, str):
        raise RecordError(f"field '{name}' must be a string, got {type(value).__name__}", "wrong_type")
    return _non_empty(value, name)


def _answer_message(value: Any, name: str, sharegpt: bool) -> dict:
    """A chat answer given as one message ({from, value} or {role, content}), a one-message
    list, or a plain string."""
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    if isinstance(value, str):
        return {"role": "assistant", "content": _non_empty(value, name)}
    if not isinstance(value, dict):
        raise RecordError(f"field '{name}' must be a message or a string, got {type(value).__name__}", "wrong_type")
    turn = _messages({"conversations" if sharegpt and "from" in value else "messages": [value]})[0]
    if turn["role"] != "assistant":
        raise RecordError(f"field '{name}': the answer must be an assistant message, got {turn['role']}",
                          "unknown_role")
    return turn


def _prompt_answer(prompt: Any, answer: Any, name: str, tokenizer: Any) -> Segments:
    """A prompt and one answer: both strings (plain text), or message lists (chat template)."""
    if isinstance(prompt, list) or isinstance(answer, list):
        messages = _messages({"messages": prompt}) if isinstance(prompt, list) else (
            [{"role": "user", "content": _answer_text(prompt, "prompt")}])
        return _chat_answer(messages, _answer_message(answer, name, sharegpt=False), tokenizer)
    if prompt is None:
        raise RecordError("missing field 'prompt'", "missing_field")
    return [(_answer_text(prompt, "prompt"), False), (_answer_text(answer, name) + _eos(tokenizer), True)]


def _chat_answer(prompt: list[dict], answer: dict, tokenizer: Any) -> Segments:
    """The rendered prompt turns and generation header (context), then the answer turn."""
    if not prompt:
        raise RecordError("a chat preference record needs at least one prompt turn", "no_shared_prompt")
    header = _render(tokenizer, prompt, generation_prompt=True)
    full = _render(tokenizer, [*prompt, answer], generation_prompt=False)
    return [(header, False), (_suffix(full, header), True)]


def _shared_prefix_units(chosen: Any, rejected: Any, tokenizer: Any) -> list[Segments]:
    """Whole transcripts (Anthropic HH): the prompt is what chosen and rejected share,
    backed up to a word boundary (message lists: the shared leading messages)."""
    if isinstance(chosen, list) and isinstance(rejected, list):
        chosen_turns, rejected_turns = _messages({"messages": chosen}), _messages({"messages": rejected})
        shared = 0
        while (shared < min(len(chosen_turns), len(rejected_turns)) - 1
               and chosen_turns[shared] == rejected_turns[shared]):
            shared += 1
        if shared == 0:
            raise RecordError("chosen and rejected share no prompt turns", "no_shared_prompt")
        return [_chat_answer(turns[:shared], _one_answer(turns, shared), tokenizer)
                for turns in (chosen_turns, rejected_turns)]
    chosen, rejected = _answer_text(chosen, "chosen"), _answer_text(rejected, "rejected")
    shared = 0
    limit = min(len(chosen), len(rejected))
    while shared < limit and chosen[shared] == rejected[shared]:
        shared += 1
    if shared == len(chosen) == len(rejected):
        raise RecordError("chosen and rejected are the same answer", "identical_pair")
    while shared and not chosen[shared - 1].isspace():
        shared -= 1  # not inside a word: both answers start at a word boundary
    if not chosen[:shared].strip():
        raise RecordError("chosen and rejected share no prompt (whole transcripts must start the same)",
                          "no_shared_prompt")
    eos = _eos(tokenizer)
    return [[(chosen[:shared], False), (_non_empty(text[shared:], name) + eos, True)]
            for text, name in ((chosen, "chosen"), (rejected, "rejected"))]


def _one_answer(turns: list[dict], shared: int) -> dict:
    rest = turns[shared:]
    if len(rest) != 1 or rest[0]["role"] != "assistant":
        raise RecordError("after the shared turns, chosen and rejected must each end in one assistant answer",
                          "no_shared_prompt")
    return rest[0]
