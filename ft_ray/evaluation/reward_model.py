"""A reward model as a GRPO reward (`grpo.rewards: {"model:<folder or hub id>": weight}`): a
sequence classifier with one output (Hugging Face's `AutoModelForSequenceClassification`, as
TRL's reward models and those it trains, or the LoRA adapter of an ft-ray `objective:
reward_model` run) scoring each prompt + answer text, as TRL scores with one. Loaded once per
process that scores (each training worker, each eval actor), on its GPU where it has one.
"""

from __future__ import annotations

from typing import Any, Callable

from ft_ray.config import InputError, ModelConfig

REWARD_MODEL = "model:"  # the grpo.rewards key prefix of a reward model
SCORE_BATCH = 16  # texts per forward pass of the reward model


def model_source_of(name: str) -> ModelConfig:
    return ModelConfig(name_or_path=name[len(REWARD_MODEL):])


def base_of(adapter: Any) -> ModelConfig:
    """The base model a LoRA reward model's adapter names."""
    return ModelConfig(name_or_path=adapter.base_model_name_or_path)


def adapter_config(name: str) -> Any:
    """The PEFT config of a reward model that is a LoRA adapter folder (an ft-ray reward_model
    run's `adapter/`), else None."""
    from pathlib import Path

    folder = Path(model_source_of(name).name_or_path).expanduser()
    if not (folder / "adapter_config.json").is_file():
        return None
    from peft import PeftConfig

    return PeftConfig.from_pretrained(str(folder))


def check_reward_model(name: str) -> None:
    """What a driver checks before a run (no weights loaded): the model's config (an
    adapter's: its base's) is there and names a sequence classifier with one score.

    Raises:
        InputError: it is not there, or not such a model.
    """
    from transformers import AutoConfig

    from ft_ray.models import from_model_source

    adapter = adapter_config(name)
    if adapter is not None and adapter.task_type != "SEQ_CLS":
        raise InputError(f"grpo.rewards: {name} is a LoRA adapter of task {adapter.task_type}; a reward model's is "
                         "SEQ_CLS (an ft-ray objective: reward_model run's adapter)")
    if adapter is not None:  # its score head comes with it
        try:
            from_model_source(AutoConfig.from_pretrained, base_of(adapter))
        except (OSError, ValueError) as e:
            raise InputError(f"grpo.rewards: cannot load the base model of {name} "
                             f"({str(e).strip().splitlines()[0]})") from None
        return
    try:
        config = from_model_source(AutoConfig.from_pretrained, model_source_of(name))
    except (OSError, ValueError) as e:
        raise InputError(f"grpo.rewards: cannot load {name} ({str(e).strip().splitlines()[0]})") from None
    architectures = getattr(config, "architectures", None) or []
    if not any(a.endswith("ForSequenceClassification") for a in architectures) or config.num_labels != 1:
        raise InputError(f"grpo.rewards: {name} is {', '.join(architectures) or 'a model of no architecture'} with "
                         f"{config.num_labels} labels; a reward model is a sequence classifier with one score "
                         "(AutoModelForSequenceClassification, num_labels 1)")


def model_reward(name: str) -> Callable[..., list[float]]:
    """The batched reward of the reward model `name` ("model:<folder or hub id>"): its score
    of each prompt + completion text, tokenized as its tokenizer does by default (its BOS
    first where it has one), right-padded, cut at its longest input."""
    import torch
    from transformers import AutoModelForSequenceClassification

    from ft_ray.models import from_model_source, load_tokenizer

    check_reward_model(name)
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    adapter = adapter_config(name)
    source = model_source_of(name)
    tokenizer = load_tokenizer(source if adapter is None else base_of(adapter))
    if adapter is None:
        model = from_model_source(AutoModelForSequenceClassification.from_pretrained, source, weights=True,
                                  dtype=dtype)
    else:  # a LoRA reward model: its base as a sequence classifier, the adapter (and score head) folded in
        from peft import PeftModel

        base = from_model_source(AutoModelForSequenceClassification.from_pretrained, base_of(adapter), weights=True,
                                 dtype=dtype, num_labels=1)
        model = PeftModel.from_pretrained(base, source.name_or_path).merge_and_unload()
    model.config.pad_token_id = tokenizer.pad_token_id  # where each row's score is read: its last token before padding
    model.to(device).eval()

    def score(prompts: list[str], completions: list[str], **_: Any) -> list[float]:
        scores: list[float] = []
        texts = [prompt + completion for prompt, completion in zip(prompts, completions)]
        for start in range(0, len(texts), SCORE_BATCH):
            inputs = tokenizer(texts[start:start + SCORE_BATCH], padding=True, truncation=True, return_tensors="pt",
                               padding_side="right").to(device)
            with torch.no_grad():
                scores += model(**inputs).logits[:, 0].float().tolist()
        return scores

    return score
