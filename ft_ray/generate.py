"""`ft-ray generate`: a person's own prompts answered by the variant (and, with `compare`, by
the base model), each prompt rendered as the run's training examples were (the chat template,
the Alpaca prompt, or as written), in this process. A look at what the fine-tune does before
serving it; `ft-ray eval` is what measures.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

from ft_ray.config import InputError, JobConfig, load_config
from ft_ray.data.formats import RecordError, detect_format, map_fields
from ft_ray.data.readers import ReadLimits
from ft_ray.data.sources import read_records, usable_records
from ft_ray.models import load_start_adapter, start_adapter_on, with_start_adapter
from ft_ray.samples import split_prompt

PROMPT_FORMATS = ("chat", "instruction", "completion")  # how a typed prompt becomes the model's input


@dataclass
class Settings:
    max_new_tokens: int = 128
    temperature: float = 0.0  # 0: greedy
    compare: bool = False  # the base model's answer too


def job_of(path: str, config_path: str | None, overrides: list[str]) -> JobConfig:
    """The job that trained what `path` holds: `config_path`, else the `config.yaml` of the
    run folder at `path` (or holding the checkpoint at `path`, or the sweep trial a winner
    folder came from).

    Raises:
        InputError: none is found (an exported folder: the job must be named).
    """
    if config_path:
        return load_config(config_path, overrides)
    folder = Path(path)
    candidates = [folder / "config.yaml", folder.parent / "config.yaml"]
    winner = folder / "winner.json"
    if winner.is_file():
        candidates.insert(0, Path(json.loads(winner.read_text())["source_checkpoint"]).parent / "config.yaml")
    for candidate in candidates:
        if candidate.is_file():
            return load_config(candidate)
    raise InputError(f"{path}: no config.yaml of a run here or in the folder above it: name the job that "
                     "trained it with --config JOB")


def prompt_format(config: JobConfig, tokenizer: Any) -> str:
    """How typed prompts are put to the model: as the prompt of the job's first training
    record was (conversation turns, or message lists in preference and prompt/completion
    records: the chat template; Alpaca fields: the instruction prompt; a prompt string, text
    or segments: as written). Where the data cannot be read here: the job's `data.format`,
    else the chat template where the tokenizer has one."""
    fmt = _first_record_shape(config) or config.data.format
    if fmt in PROMPT_FORMATS:
        return fmt
    return "chat" if fmt not in ("text", "segments") and getattr(tokenizer, "chat_template", None) else "completion"


def _first_record_shape(config: JobConfig) -> str | None:
    key, source = config.data.keyed_sources()[0]
    try:
        record = next(usable_records(source, config.storage, key, ReadLimits.of(config.data, source)), None)
    except (InputError, OSError):  # the data is not here (a run copied elsewhere): no shape
        return None
    if record is None:
        return None
    if "messages" in record or "conversations" in record or any(isinstance(record.get(k), list)
                                                                 for k in ("prompt", "completion", "chosen")):
        return "chat"
    return "instruction" if "instruction" in record else "completion"


def render(prompt: str, fmt: str, tokenizer: Any) -> str:
    """A typed prompt as the model saw prompts in training (the text before the answer)."""
    if fmt == "completion":
        return prompt
    record = ({"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": "-"}]}
              if fmt == "chat" else {"instruction": prompt, "output": "-"})
    return split_prompt(record, fmt, tokenizer)[0]


def records_of(path: Path, config: JobConfig) -> Iterator[tuple[str, dict]]:
    """(format, record) of each record of a file in a training format (JSONL, JSON, CSV,
    Parquet, gzip: as training reads them; fields mapped as the job's data.fields).

    Raises:
        InputError: a record that is not one (file and line named).
    """
    for file, line, text, error in read_records(str(path), config.storage, "--file"):
        try:
            if error:
                raise RecordError(error)
            record = map_fields(json.loads(text), config.data.fields)
            yield detect_format(record), record
        except (json.JSONDecodeError, RecordError) as e:
            raise InputError(f"{file}:{line}: {e}") from None


class Answerer:
    """The variant loaded once (and the base: the adapter switched off, or the base model
    beside a full fine-tune's or beside an adapter trained with `model.rope_scaling`, with
    its own RoPE; and the adapter a run trained on from, `model.adapter`, beside the variant's
    as PEFT's "start"), answering one prompt at a time."""

    def __init__(self, config: JobConfig, weights: Path, settings: Settings):
        from ft_ray.models import load_base_model, load_tokenizer, own_rope
        from ft_ray.samples import load_variant

        self.settings = settings
        self.tokenizer = load_tokenizer(config.model)
        adapter = (weights / "adapter_config.json").is_file()
        self.variant = load_variant(load_base_model(config.model) if adapter else None, weights)
        self.shared = adapter and config.model.rope_scaling == "none"  # the base: the adapter switched off
        self.base = load_base_model(own_rope(config.model)) if settings.compare and not self.shared else None
        if settings.compare and adapter:
            config = with_start_adapter(config)  # the folder of model.adapter; none where it is gone (a warning)
        self.start = bool(settings.compare and adapter and config.model.adapter)
        if self.start:
            load_start_adapter(self.variant, config)

    def answer(self, prompt: str) -> dict[str, str]:
        from ft_ray.models import generate

        def reply(model: Any) -> str:
            return generate(model, self.tokenizer, prompt, self.settings.max_new_tokens,
                            self.settings.temperature).strip()

        answers = {"variant": reply(self.variant)}
        if self.start:
            with start_adapter_on(self.variant):
                answers["start"] = reply(self.variant)
        if self.settings.compare:
            if self.shared:
                with self.variant.disable_adapter():
                    answers["base"] = reply(self.variant)
            else:
                answers["base"] = reply(self.base)
        return answers


def answers(answerer: Answerer, prompts: Iterable[tuple[str, str | None]]) -> Iterator[dict[str, str]]:
    """For each (model input, reference or None): the input, the reference, the answers."""
    for model_input, reference in prompts:
        yield {"prompt": model_input, **({"reference": reference} if reference is not None else {}),
               **answerer.answer(model_input)}
