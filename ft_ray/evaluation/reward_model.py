"""A reward model as a GRPO reward (`grpo.rewards: {"model:<folder or hub id>": weight}`): a
sequence classifier with one output (Hugging Face's `AutoModelForSequenceClassification`, as
TRL's reward models and those it trains, or the LoRA adapter of an ft-ray `objective:
reward_model` run) scoring each prompt + answer as such a run trains on one (bos, prompt, answer,
eos; the score at the eos). Loaded once per process that scores (each training worker, each
eval actor), on its GPU where it has one.
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
    """The batched reward of the reward model `name` ("model:<folder or hub id>"): its score of
    each prompt + completion as an ft-ray reward model trains on one: its bos, the prompt's
    tokens, the completion's with the eos after it (`answer_ids`), the score read at that
    last token (`last_token_scores`); cut at the model's context window."""
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
    model.config.pad_token_id = tokenizer.pad_token_id
    model.to(device).eval()
    window = getattr(model.config, "max_position_embeddings", None)

    def score(prompts: list[str], completions: list[str], **_: Any) -> list[float]:
        sequences = [ids[:window] for ids in answer_ids(tokenizer, prompts, completions)]
        return last_token_scores(model, sequences, tokenizer.pad_token_id, SCORE_BATCH)

    return score


def answer_ids(tokenizer: Any, prompts: list[str], answers: list[str]) -> list[list[int]]:
    """Each prompt + answer as training assembles a record (`data.tokenize.assemble`): the bos,
    the prompt's tokens, then the answer's, which ends with the eos (added where it does not)."""
    from ft_ray.data.tokenize import bos_id, encode_batch

    eos = tokenizer.eos_token or ""
    bos = [] if bos_id(tokenizer) is None else [bos_id(tokenizer)]
    ended = [a if a.endswith(eos) else a + eos for a in answers]
    return [bos + p + a for p, a in zip(encode_batch(tokenizer, list(prompts)),
                                        encode_batch(tokenizer, ended, [True] * len(ended)))]  # after the prompt


def last_token_scores(model: Any, sequences: list[list[int]], pad_id: int, batch_size: int) -> list[float]:
    """The score head's output at each sequence's last token, where a reward model read an
    answer's score in training (right-padded batches; the model's own pooling would read the
    token before a trailing eos that is also the pad token). A model without a `score` head
    (an encoder's classifier): its own pooled score."""
    import torch

    from ft_ray.train.reward_modeling import score_head

    try:
        head = score_head(model)
    except ValueError:
        head = None
    outputs: list[torch.Tensor] = []
    hook = head.register_forward_hook(lambda _m, _a, output: outputs.append(output)) if head is not None else None
    device = next(model.parameters()).device
    scores: list[float] = []
    try:
        for start in range(0, len(sequences), batch_size):
            chunk = sequences[start:start + batch_size]
            width = max(map(len, chunk))
            ids = torch.tensor([s + [pad_id] * (width - len(s)) for s in chunk], device=device)
            mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in chunk], device=device)
            outputs.clear()
            with torch.no_grad():
                pooled = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
            if head is None:
                scores += pooled[:, 0].float().tolist()
            else:
                last = torch.tensor([len(s) - 1 for s in chunk], device=device)
                scores += outputs[0][torch.arange(len(chunk), device=device), last, 0].float().tolist()
    finally:
        if hook is not None:
            hook.remove()
    return scores
