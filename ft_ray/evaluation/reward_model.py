"""A reward model as a GRPO reward (`grpo.rewards: {"model:<folder, hub id or s3:// folder>":
weight}`): a sequence classifier with one output (Hugging Face's
`AutoModelForSequenceClassification`, as TRL's reward models and those it trains, or the LoRA
adapter of an ft-ray `objective: reward_model` run) scoring each prompt + answer as such a run
trains on one (bos, prompt, answer, eos; the score at the eos). Loaded once per process that
scores (each training worker, each eval actor), on its GPU where it has one. An s3:// folder
(read with the job's storage section) is copied to the node's model cache as an s3:// model is
(`storage.cached_model`).
"""

from __future__ import annotations

from typing import Any, Callable

from ft_ray.config import REWARD_MODEL_PREFIX, InputError, ModelConfig, StorageConfig

REWARD_MODEL = REWARD_MODEL_PREFIX  # the grpo.rewards key prefix of a reward model
SCORE_BATCH = 16  # texts per forward pass of the reward model


def reward_model_folder(name: str, storage: StorageConfig | None, weights: bool = False) -> str:
    """Where reward model `name` loads from: its folder or hub id, or an s3:// folder's copy in
    this node's model cache (with `weights`, its weight files too).

    Raises:
        InputError: an s3:// folder with no files, or a store that fails."""
    path = name[len(REWARD_MODEL):]
    if not path.startswith("s3://"):
        return path
    from ft_ray.storage import cached_model

    try:
        return str(cached_model(path, storage or StorageConfig(), weights))
    except OSError as e:
        raise InputError(f"grpo.rewards: {name}: {e}") from None


def model_source_of(name: str, storage: StorageConfig | None = None, weights: bool = False) -> ModelConfig:
    return ModelConfig(name_or_path=reward_model_folder(name, storage, weights))


def base_of(adapter: Any, storage: StorageConfig | None = None) -> ModelConfig:
    """The base model a LoRA reward model's adapter names (an s3:// one read with `storage`)."""
    base = ModelConfig(name_or_path=adapter.base_model_name_or_path)
    if storage is not None:
        base.use_storage(storage)
    return base


def adapter_config(name: str, storage: StorageConfig | None = None) -> Any:
    """The PEFT config of a reward model that is a LoRA adapter folder (an ft-ray reward_model
    run's `adapter/`), else None."""
    from pathlib import Path

    folder = Path(reward_model_folder(name, storage)).expanduser()
    if not (folder / "adapter_config.json").is_file():
        return None
    from peft import PeftConfig

    return PeftConfig.from_pretrained(str(folder))


def check_reward_model(name: str, storage: StorageConfig | None = None) -> None:
    """What a driver checks before a run (no weights loaded): the model's config (an
    adapter's: its base's) is there and names a sequence classifier with one score.

    Raises:
        InputError: it is not there, or not such a model.
    """
    from transformers import AutoConfig

    from ft_ray.models import from_model_source

    adapter = adapter_config(name, storage)
    if adapter is not None and adapter.task_type != "SEQ_CLS":
        raise InputError(f"grpo.rewards: {name} is a LoRA adapter of task {adapter.task_type}; a reward model's is "
                         "SEQ_CLS (an ft-ray objective: reward_model run's adapter)")
    if adapter is not None:  # its score head comes with it
        try:
            from_model_source(AutoConfig.from_pretrained, base_of(adapter, storage))
        except (OSError, ValueError) as e:
            raise InputError(f"grpo.rewards: cannot load the base model of {name} "
                             f"({str(e).strip().splitlines()[0]})") from None
        return
    try:
        config = from_model_source(AutoConfig.from_pretrained, model_source_of(name, storage))
    except (OSError, ValueError) as e:
        raise InputError(f"grpo.rewards: cannot load {name} ({str(e).strip().splitlines()[0]})") from None
    architectures = getattr(config, "architectures", None) or []
    if not any(a.endswith("ForSequenceClassification") for a in architectures) or config.num_labels != 1:
        raise InputError(f"grpo.rewards: {name} is {', '.join(architectures) or 'a model of no architecture'} with "
                         f"{config.num_labels} labels; a reward model is a sequence classifier with one score "
                         "(AutoModelForSequenceClassification, num_labels 1)")


def model_reward(name: str, storage: StorageConfig | None = None) -> Callable[..., list[float]]:
    """The batched reward of the reward model `name` ("model:<folder, hub id or s3:// folder>",
    the last read with `storage`): its score of
    each prompt + completion as an ft-ray reward model trains on one: its bos, the prompt's
    tokens, the completion's with the eos after it (`answer_ids`), the score read at that
    last token (`last_token_scores`); cut at the model's context window."""
    import torch
    from transformers import AutoModelForSequenceClassification

    from ft_ray.models import from_model_source, load_tokenizer

    check_reward_model(name, storage)
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    adapter = adapter_config(name, storage)
    source = model_source_of(name, storage, weights=True)
    tokenizer = load_tokenizer(source if adapter is None else base_of(adapter, storage))
    if adapter is None:
        model = from_model_source(AutoModelForSequenceClassification.from_pretrained, source, weights=True,
                                  dtype=dtype)
    else:  # a LoRA reward model: its base as a sequence classifier, the adapter (and score head) folded in
        from peft import PeftModel

        base = from_model_source(AutoModelForSequenceClassification.from_pretrained, base_of(adapter, storage),
                                 weights=True, dtype=dtype, num_labels=1)
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
