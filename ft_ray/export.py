"""Export a trained variant: the PEFT adapter, or merged / full weights in safetensors.

Everything written here loads with transformers or PEFT alone, without ft-ray.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

from ft_ray.config import InputError, JobConfig, load_config
from ft_ray.console import LOG


class ExportError(InputError):
    """The given path holds no checkpoint ft-ray can export."""


def load_trainable_weights(module: Any, folder: Path) -> None:
    """Load what `save_pretrained` wrote into `module`: an adapter, or a full model."""
    from safetensors.torch import load_file

    adapter = folder / "adapter_model.safetensors"
    if adapter.exists():
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(module, load_file(str(adapter)))
        return
    shards = sorted(folder.glob("*.safetensors"))
    if not shards:
        raise ExportError(f"{folder}: no safetensors weights")
    state: dict = {}
    for shard in shards:
        state.update(load_file(str(shard)))
    missing, unexpected = module.load_state_dict(state, strict=False)
    if unexpected or [k for k in missing if "lm_head" not in k]:
        raise ExportError(f"{folder}: weights do not match the model (missing {missing[:3]}, unexpected {unexpected[:3]})")


def find_checkpoint(path: Path) -> Path:
    """The checkpoint folder to export from a run folder (best by eval loss, else newest)
    or from a checkpoint folder itself."""
    path = Path(path)
    if (path / "trainer_state.json").exists():
        return path
    summary = path / "summary.json"
    if summary.exists():
        best = json.loads(summary.read_text()).get("best_checkpoint")
        if best and (Path(best) / "trainer_state.json").exists():
            return Path(best)
    checkpoints = sorted(p for p in path.glob("checkpoint-*") if (p / "trainer_state.json").exists())
    if not checkpoints:
        raise ExportError(f"{path}: neither a checkpoint (no trainer_state.json) nor a run folder with checkpoints")
    return checkpoints[-1]


def run_config_of(checkpoint: Path) -> JobConfig:
    config = checkpoint.parent / "config.yaml"
    if not config.exists():
        raise ExportError(f"{checkpoint}: no config.yaml in the run folder {checkpoint.parent}")
    return load_config(config)


def export_checkpoint(path: Path, out: Path, merge: bool = False, config: JobConfig | None = None) -> Path:
    """Write the variant at `path` (run folder or checkpoint) to `out`.

    LoRA checkpoints give a PEFT adapter folder, or with `merge` a full model with the
    adapter folded into the base weights. Full fine-tunes give the full model either way.
    The tokenizer is written next to the weights. `config` is the run's job (default: the
    `config.yaml` of the run folder holding the checkpoint). The folder is written beside
    `out` and then put in its place, replacing what `out` held: never half an export, nor an
    adapter beside the weights of an earlier merged export (transformers would load either).

    Raises:
        ExportError: no checkpoint at `path`, or its files differ from its manifest (missing,
            cut short, changed: named), so it is not trusted.
    """
    from ft_ray.models import load_tokenizer, rope_overrides, stored_base
    from ft_ray.train.checkpoints import digest_problem

    checkpoint = find_checkpoint(Path(path))
    problem = digest_problem(checkpoint)
    if problem:
        raise ExportError(f"{checkpoint}: {problem}; not exported (the checkpoint is incomplete or was changed)")
    weights = checkpoint / "model"
    config = config or run_config_of(checkpoint)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tokenizer = load_tokenizer(config.model)
    adapter, rope = (weights / "adapter_config.json").exists(), rope_overrides(config.model)
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.partial-", dir=out.parent) as partial:
        written = Path(partial) / out.name
        written.mkdir()
        if adapter and merge:
            merge_adapter(weights, written, len(tokenizer), rope, stored_base(config.model))
        else:
            for item in weights.iterdir():
                shutil.copy2(item, written / item.name)
        tokenizer.save_pretrained(written)
        if out.exists():
            shutil.rmtree(out)
        written.rename(out)
    if adapter and rope and not merge:
        LOG.info(f"note: the adapter in {out} trained on {config.model.name_or_path} with its RoPE stretched "
                 f"(model.rope_scaling): load that base with "
                 f"{', '.join(f'{key}={value!r}' for key, value in rope.items())} (from_pretrained takes them), "
                 "or export the model merged (--merge), whose config.json has them")
    return out


def merge_adapter(adapter: Path, out: Path, vocab_size: int | None = None, rope: dict | None = None,
                  base: str | None = None) -> None:
    """Fold a LoRA adapter into its base model and save the result in safetensors. The base
    grows to `vocab_size` (default: the tokenizer saved with the adapter) when the run added
    tokens, as a user loading the adapter with plain PEFT would do first, and loads with the
    config settings `rope` (`rope_overrides`: the RoPE the adapter trained with). `base`: the
    base model's folder (`models.stored_base`), where the adapter's name of it is not one
    transformers loads."""
    from peft import PeftConfig, PeftModel
    from transformers import AutoTokenizer

    from ft_ray.models import model_class

    peft_config = PeftConfig.from_pretrained(str(adapter))
    base_path, scores = base or peft_config.base_model_name_or_path, peft_config.task_type == "SEQ_CLS"
    LOG.info(f"export: merging the adapter into {peft_config.base_model_name_or_path} (loading its weights: minutes "
             "for a large model)")
    saved_with = (adapter / "tokenizer_config.json").exists()
    tokenizer = AutoTokenizer.from_pretrained(str(adapter if saved_with else base_path))
    # a reward model's (SEQ_CLS): one score (its trained head comes with the adapter), read at
    # each row's last token before the padding
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    base = model_class(scores).from_pretrained(base_path, **({"num_labels": 1, "pad_token_id": pad} if scores else {}),
                                               **(rope or {}))
    if vocab_size is None and saved_with:
        vocab_size = len(tokenizer)
    if vocab_size and base.get_input_embeddings().num_embeddings < vocab_size:
        base.resize_token_embeddings(vocab_size)
    merged = PeftModel.from_pretrained(base, str(adapter)).merge_and_unload()
    merged.save_pretrained(out, safe_serialization=True)
