"""Write `builtin:tiny-llama`: a byte-level BPE tokenizer with a chat template, a Llama
config, and weights pre-trained for a few minutes on CPU.

A randomly initialised model is a poor stand-in for a base model: its output layer is too
weak to be confident, so no adapter can lower its loss much. This one is pre-trained on
generic customer-support replies (`make_generic_records`), so it answers the demo's
requests politely but without the Northwind house style; fine-tuning teaches the style.
Everything is seeded: rerunning the script rewrites the same files on the same torch build.
The tokenizer is trained on the same texts; byte-level fallback covers any other text.

    python -m ft_ray.assets.make_tiny_llama
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

ASSETS = Path(__file__).resolve().parent
OUT = ASSETS / "tiny-llama"
VOCAB_SIZE = 2048  # an upper bound: the demo corpus yields fewer merges
SPECIAL = {"bos": "<|begin|>", "eos": "<|end|>", "pad": "<|pad|>"}
ROLE_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>"]
# Each turn renders as "<|role|>\ncontent<|end|>\n": rendering messages[:i] is always a
# prefix of rendering messages[:i+1], which the loss masking of chat records relies on.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + '<|end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)
MODEL_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 128,
    "intermediate_size": 352,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 1024,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
    "initializer_range": 0.02,
    "torch_dtype": "float32",
}


PRETRAIN = {"records": 3000, "seed": 7, "steps": 800, "batch": 8, "seq_len": 256, "lr": 3e-3}


def pretraining_records() -> list[dict]:
    from ft_ray.assets.make_demo_corpus import make_generic_records

    return make_generic_records(PRETRAIN["records"], PRETRAIN["seed"])


def training_texts() -> list[str]:
    texts = []
    for path in sorted((ASSETS / "demo").glob("*.jsonl")):
        for line in path.read_text(encoding="utf-8").splitlines():
            texts.extend(str(v) for v in json.loads(line).values())
    for record in pretraining_records():
        texts.extend(record.values())
    return texts


def pretrain(tokenizer) -> Any:
    """Causal-LM training from a seeded init on the generic records, packed, full weights."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from ft_ray.data.formats import record_segments
    from ft_ray.data.tokenize import pack_examples, tokenize_segments

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(OUT), attn_implementation="sdpa")
    examples = [tokenize_segments([(text, True) for text, _ in record_segments(r, "instruction", tokenizer)],
                                  tokenizer, PRETRAIN["seq_len"]) for r in pretraining_records()]
    packed = list(pack_examples(examples, PRETRAIN["seq_len"], tokenizer.pad_token_id))
    columns = {k: torch.tensor(np.stack([p[k] for p in packed])).long() for k in ("input_ids", "labels", "position_ids")}
    optimizer = torch.optim.AdamW(model.parameters(), lr=PRETRAIN["lr"], weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, PRETRAIN["lr"], total_steps=PRETRAIN["steps"])
    generator = torch.Generator().manual_seed(0)
    model.train()
    for step in range(PRETRAIN["steps"]):
        rows = torch.randint(len(packed), (PRETRAIN["batch"],), generator=generator)
        loss = model(**{k: v[rows] for k, v in columns.items()}, use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        if step % 50 == 0 or step == PRETRAIN["steps"] - 1:
            print(f"pretrain step {step}: loss {loss.item():.3f}")
    return model


def build_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=[SPECIAL["pad"], SPECIAL["bos"], SPECIAL["eos"], *ROLE_TOKENS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(training_texts(), trainer=trainer)
    return tokenizer


def main() -> None:
    from transformers import PreTrainedTokenizerFast

    OUT.mkdir(parents=True, exist_ok=True)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=build_tokenizer(),
        bos_token=SPECIAL["bos"], eos_token=SPECIAL["eos"], pad_token=SPECIAL["pad"],
        additional_special_tokens=ROLE_TOKENS,
        model_max_length=MODEL_CONFIG["max_position_embeddings"],
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(OUT)
    config = dict(MODEL_CONFIG, vocab_size=-(-len(fast) // 64) * 64,
                  bos_token_id=fast.bos_token_id, eos_token_id=fast.eos_token_id,
                  pad_token_id=fast.pad_token_id)
    (OUT / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    pretrain(fast).save_pretrained(OUT, safe_serialization=True)
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
