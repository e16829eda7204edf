"""Held-out prompts answered by the base model and by the variant, side by side.

A quick look, not a metric (the evaluation module measures): it shows a person what the
fine-tune changed. Runs in the calling process, so it is meant for small models.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any, Iterator

from ft_ray.config import JobConfig
from ft_ray.data.formats import record_segments
from ft_ray.data.records import eval_bucket
from ft_ray.data.tokenize import answer_text
from ft_ray.data.sources import usable_records


def held_out_records(config: JobConfig, limit: int) -> Iterator[dict]:
    """The first `limit` usable eval records, read record by record (never the whole file)."""
    data = config.data
    held_out = None if data.eval else (lambda text: eval_bucket(text) < data.eval_fraction)
    return itertools.islice(usable_records(data.eval_source() or data.all_sources()[0], config.storage,
                                           "data.eval" if data.eval else "data.train", keep=held_out), limit)


def split_prompt(record: dict, fmt: str, tokenizer: Any) -> tuple[str, str]:
    """(prompt, reference): the masked text before the first trained segment, and that segment."""
    segments = record_segments(record, fmt, tokenizer)
    first_trained = next(i for i, (_, trainable) in enumerate(segments) if trainable)
    prompt = "".join(text for text, _ in segments[:first_trained])
    return prompt, answer_text(tokenizer, segments[first_trained][0])


def compare_generations(config: JobConfig, adapter_or_model: str, limit: int,
                        max_new_tokens: int = 64) -> list[dict[str, str]]:
    """Greedy answers of the base model and of the variant to `limit` held-out prompts."""
    from ft_ray.models import generate, load_base_model, load_tokenizer

    tokenizer = load_tokenizer(config.model)
    pairs = [split_prompt(r, config.data.format, tokenizer) for r in held_out_records(config, limit)]
    base = load_base_model(config.model)
    answers = [{"prompt": p, "reference": ref, "base": generate(base, tokenizer, p, max_new_tokens)}
               for p, ref in pairs]
    variant = load_variant(base, Path(adapter_or_model))
    for answer in answers:
        answer["variant"] = generate(variant, tokenizer, answer["prompt"], max_new_tokens)
    return answers


def load_variant(base: Any, path: Path) -> Any:
    """The variant at `path`: an adapter folder applied to `base`, or a whole model."""
    if (path / "adapter_config.json").exists():
        from peft import PeftModel

        return PeftModel.from_pretrained(base, str(path))
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path))
