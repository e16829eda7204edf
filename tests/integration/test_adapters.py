"""LoRA variants users pick from papers (DoRA, rsLoRA, PiSSA), trained by 2 workers (DoRA, whose
magnitude vector is a parameter of its own, with ZeRO-2, and with DDP in the new-tokens run
below; PiSSA, an initialisation, with rsLoRA, a scaling, in one run under ZeRO-2), exported as
an adapter whose config carries the variant, loaded by plain PEFT (no ft-ray) with the same
outputs as the merged model ft-ray exports."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from ft_ray.cli import main
from ft_ray.config import load_config
from ft_ray.train.trainer import run_training
from tests.conftest import write_job
from tests.integration.test_train import LOAD_WITHOUT_FT_RAY

pytestmark = [pytest.mark.integration, pytest.mark.slow]

VARIANTS = {"dora": {"use_dora": True}, "pissa-rslora": {"init": "pissa", "use_rslora": True}}


@pytest.mark.parametrize("variant", ["dora", "pissa-rslora"])
def test_lora_variant_trains_exports_reloads_in_peft_and_merges(ray_local, tmp_path, variant):
    config = load_config(write_job(
        tmp_path, run_name=f"{variant}-zero2", lora=VARIANTS[variant],
        distributed={"strategy": "deepspeed", "deepspeed": {"stage": 2}},
        train={"max_steps": 2, "checkpoint_every": 2, "eval_every": 2}))
    summary = run_training(config)
    assert summary["eval_loss_final"] < summary["eval_loss_initial"]
    adapter = Path(summary["adapter_path"])
    settings = json.loads((adapter / "adapter_config.json").read_text())
    assert (settings["use_dora"], settings["use_rslora"], settings["init_lora_weights"]) == (
        variant == "dora", variant == "pissa-rslora", "pissa" if variant == "pissa-rslora" else True)
    assert main(["export", summary["best_checkpoint"], "--out", str(tmp_path / "merged"), "--merge"]) == 0
    out = subprocess.run([sys.executable, "-c", LOAD_WITHOUT_FT_RAY, str(adapter), str(tmp_path / "merged")],
                         capture_output=True, text=True, check=True, cwd=tmp_path)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["max_diff"] < 1e-4  # plain PEFT with the adapter == the merged model
    assert result["adapter_changes_output"] > 1e-3  # and the adapter was trained


HOUSE_TEMPLATE = ("{% for m in messages %}<|house|>{{ m['role'] }}\n{{ m['content'] }}<|end_house|>\n{% endfor %}"
                  "{% if add_generation_prompt %}<|house|>assistant\n{% endif %}")

LOAD_NEW_TOKENS = """
import sys
sys.modules["ft_ray"] = None  # plain transformers and PEFT only
import json, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from peft import PeftModel
adapter, merged = sys.argv[1], sys.argv[2]
tokenizer = AutoTokenizer.from_pretrained(merged)
text = tokenizer.apply_chat_template([{"role": "user", "content": "Say hi."}], tokenize=False, add_generation_prompt=True)
ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids
base = AutoModelForCausalLM.from_pretrained(json.load(open(adapter + "/adapter_config.json"))["base_model_name_or_path"])
vocab = len(AutoTokenizer.from_pretrained(adapter))
if base.get_input_embeddings().num_embeddings < vocab:  # grow the base as PEFT's docs say for added tokens
    base.resize_token_embeddings(vocab)
with torch.no_grad():
    via_peft = PeftModel.from_pretrained(base, adapter).eval()(ids).logits
    via_merge = AutoModelForCausalLM.from_pretrained(merged).eval()(ids).logits
print(json.dumps({"text": text, "ids": ids[0].tolist(), "vocab": len(tokenizer),
                  "new_ids": tokenizer.convert_tokens_to_ids(["<|house|>", "<|end_house|>"]),
                  "max_diff": (via_peft - via_merge).abs().max().item()}))
"""


def test_new_tokens_and_a_chat_template_train_and_export_with_their_tokenizer(ray_local, tmp_path):
    """Tokens the model lacks and a chat template of them, on 2 DDP workers with DoRA: the new
    rows train and are saved with the adapter, whose tokenizer plain PEFT and transformers
    load; the merged model gives PEFT's outputs."""
    from tests.conftest import DEMO

    (tmp_path / "house.jinja").write_text(HOUSE_TEMPLATE)
    corpus = tmp_path / "chats.jsonl"
    corpus.write_text("".join(json.dumps({"messages": [{"role": "user", "content": r["instruction"]},
                                                       {"role": "assistant", "content": r["output"]}]}) + "\n"
                              for r in map(json.loads, (DEMO / "train.jsonl").read_text().splitlines())))
    config = load_config(write_job(
        # 62 tokens: past the 768 rows the tiny model has (716 used), so the embeddings must grow
        tmp_path, run_name="new-tokens", model={"add_tokens": ["<|house|>", "<|end_house|>",
                                                               *(f"<|tag{i}|>" for i in range(60))],
                                                "chat_template": str(tmp_path / "house.jinja")},
        lora=VARIANTS["dora"], data={"train": str(corpus), "eval": None, "format": "chat"},
        train={"max_steps": 2, "checkpoint_every": 2, "eval_every": 2}))
    summary = run_training(config)
    assert summary["data"]["records_rejected"] == 0 and summary["eval_loss_final"] < summary["eval_loss_initial"]
    adapter = Path(summary["adapter_path"])
    settings = json.loads((adapter / "adapter_config.json").read_text())
    # model.new_tokens: rows (the default): only the new tokens' rows train, saved with the adapter
    new_ids = list(range(716, 716 + 62))
    assert settings["modules_to_save"] is None and settings["use_dora"]
    assert settings["trainable_token_indices"] == {"embed_tokens": new_ids, "lm_head": new_ids}
    assert main(["export", summary["best_checkpoint"], "--out", str(tmp_path / "merged"), "--merge"]) == 0
    out = subprocess.run([sys.executable, "-c", LOAD_NEW_TOKENS, str(adapter), str(tmp_path / "merged")],
                         capture_output=True, text=True, check=True, cwd=tmp_path)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["text"] == "<|house|>user\nSay hi.<|end_house|>\n<|house|>assistant\n"
    assert result["vocab"] == 716 + 62 and result["new_ids"] == [716, 717] and 716 in result["ids"]
    assert result["max_diff"] < 1e-4
