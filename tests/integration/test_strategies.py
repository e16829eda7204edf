"""DeepSpeed ZeRO, FSDP2 and QLoRA workers: real deepspeed.initialize and fully_shard (gloo,
CPU) and real bitsandbytes 4-bit, 2 Ray workers each."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ft_ray.cli import main
from ft_ray.config import InputError, load_config
from ft_ray.train.trainer import run_training
from tests.conftest import DEMO, write_job

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def zero_job(tmp_path, stage: int, run_name: str, **train):
    """A full fine-tune under ZeRO `stage`, evaluated on the demo's first 19 eval records: 5 eval
    batches, so one worker of two runs one more (a sharded model's forward is a collective:
    `loop.evaluate` has the other run it too, and collectives time out in 2 minutes, not 30)."""
    (tmp_path / "eval.jsonl").write_text("".join((DEMO / "eval.jsonl").read_text().splitlines(keepends=True)[:19]))
    return load_config(write_job(
        tmp_path, run_name=run_name, method="full", data={"eval": str(tmp_path / "eval.jsonl")},
        distributed={"strategy": "deepspeed", "deepspeed": {"stage": stage}, "timeout_s": 120},
        train={"learning_rate": 5e-4, "max_steps": 4, "checkpoint_every": 2, "eval_every": 2, **train}))


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def zero2_first_steps(ray_local, tmp_path_factory):
    """A ZeRO-2 full fine-tune's first 2 steps on two workers: its config, summary and metric
    lines (the ZeRO test below goes on with the same run; the FSDP test compares with them)."""
    config = zero_job(tmp_path_factory.mktemp("zero2"), 2, "zero2", max_steps=2)
    summary = run_training(config)
    return config, summary, metrics(Path(config.storage.path) / config.run_name)


@pytest.mark.parametrize("stage", [2, 3])
def test_zero_full_fine_tune_checkpoints_every_rank_resumes_and_keeps_its_worker_count(request, tmp_path, stage):
    """ZeRO-2 with DeepSpeed's AdamW, ZeRO-3 with bitsandbytes' 8-bit AdamW (train.optimizer
    adamw_8bit, DeepSpeed's client optimizer: each rank's shard holds its uint8 states): the loss
    falls, every rank checkpoints its shard, a relaunch resumes, the export is whole."""
    if stage == 2:
        config, first, _ = request.getfixturevalue("zero2_first_steps")
    else:
        request.getfixturevalue("ray_local")
        config = zero_job(tmp_path, stage, f"zero{stage}", max_steps=2, optimizer="adamw_8bit")
        first = run_training(config)
    run = Path(config.storage.path) / config.run_name
    assert first["eval_loss_final"] < first["eval_loss_initial"]

    folder = run / "checkpoint-000002" / "deepspeed" / "state"
    shards = sorted(p.name for p in folder.glob("*optim_states.pt"))
    assert len(shards) == 2, f"expected one optimizer shard per rank, found {shards}"
    assert {"0", "1"} == {name.split("_")[3] for name in shards}  # zero_pp_rank_<r>_...
    if stage == 3:
        from ft_ray.train.deepspeed_engine import weights_only_checkpoint_engine
        from tests.unit.train.test_fsdp_engine import gathered_tensors

        for name in shards:
            state = weights_only_checkpoint_engine().load(str(folder / name))
            assert torch.uint8 in {t.dtype for t in gathered_tensors(state)}, name

    # Continue the same run to 4 steps: it resumes from step 2 with optimizer and scheduler state.
    config.train.max_steps = 4
    second = run_training(config)
    assert second["steps"] == 4
    steps = [m["step"] for m in metrics(run) if "loss" in m]
    assert steps == [1, 2, 3, 4]
    assert second["eval_loss_final"] < first["eval_loss_initial"]

    out = tmp_path / f"export{stage}"
    assert main(["export", str(run), "--out", str(out)]) == 0
    weights = load_file(str(out / "model.safetensors"))
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.model.layers[0].self_attn.q_proj.weight.shape == (128, 128)
    assert all(t.numel() > 0 for t in weights.values())  # consolidated, not ZeRO-3 placeholders

    if stage == 3:  # ZeRO-3 shards hold parts of the weights: another worker count cannot load them
        config.distributed.num_workers = 1
        config.train.max_steps = 6
        with pytest.raises(InputError, match=r"holds ZeRO shards of 2 workers; this run has 1.*num_workers=2"):
            run_training(config)  # said by the driver, before any worker builds the model
        assert steps == [m["step"] for m in metrics(run) if "loss" in m]


def test_fsdp_trains_as_zero2_does_and_resumes_on_another_worker_count(zero2_first_steps, tmp_path):
    """A full fine-tune on two workers, with ZeRO-2 (its optimizer states and gradients
    partitioned) and with FSDP2 (each worker holding half of every weight, gradient and AdamW
    state): the same loss and gradient norm at each step. FSDP's checkpoint holds every rank's
    DCP shard; a relaunch on one worker re-shards it and trains on (ZeRO-3 refuses that,
    above); the export holds the last checkpoint's weights. Its 5 eval batches are scored
    on 2 workers (before, the one with 2 waited for the other's third forward forever)."""
    _, zero2, reference = zero2_first_steps
    config = zero_job(tmp_path, 2, "fsdp", max_steps=2)
    config.distributed.strategy = "fsdp"
    first = run_training(config)
    assert first["data"]["eval_sequences"] == 19  # 5 batches of 4: an odd share, each forward a collective
    run = Path(config.storage.path) / config.run_name
    logged = [m[key] for m in metrics(run) if "loss" in m for key in ("loss", "grad_norm")]
    expected = [m[key] for m in reference if "loss" in m for key in ("loss", "grad_norm")]
    assert logged == pytest.approx(expected, rel=1e-5) and len(logged) == 4
    assert first["eval_loss_final"] == pytest.approx(zero2["eval_loss_final"], rel=1e-5)
    assert {p.name for p in (run / "checkpoint-000002" / "fsdp").iterdir()} == {".metadata", "__0_0.distcp",
                                                                               "__1_0.distcp"}
    config.distributed.num_workers, config.train.max_steps = 1, 4
    second = run_training(config)
    assert [m["step"] for m in metrics(run) if "loss" in m] == [1, 2, 3, 4]
    assert second["eval_loss_final"] < first["eval_loss_final"]
    assert {p.name for p in (run / "checkpoint-000004" / "fsdp").iterdir()} == {".metadata", "__0_0.distcp"}

    out = tmp_path / "export-fsdp"
    assert main(["export", str(run), "--out", str(out)]) == 0
    from transformers import AutoModelForCausalLM

    exported = AutoModelForCausalLM.from_pretrained(out).state_dict()
    saved = load_file(str(run / "checkpoint-000004" / "model" / "model.safetensors"))
    assert saved and all(torch.equal(exported[name], weight) for name, weight in saved.items())


def test_qlora_trains_adapters_over_a_4bit_base_under_zero2(ray_local, tmp_path):
    """(QLoRA on DDP workers: KTO's run in test_preference.py.)"""
    config = load_config(write_job(
        tmp_path, run_name="qlora-zero2", method="qlora",
        quantization={"compute_dtype": "float32"},
        distributed={"strategy": "deepspeed", "deepspeed": {"stage": 2}},
        train={"max_steps": 4, "checkpoint_every": 4, "eval_every": 4}))
    summary = run_training(config)
    assert summary["eval_loss_final"] < summary["eval_loss_initial"]
    adapter = Path(summary["adapter_path"])
    assert set(load_file(str(adapter / "adapter_model.safetensors"))) and all(
        "lora_" in k for k in load_file(str(adapter / "adapter_model.safetensors")))
    out = tmp_path / "merged"
    assert main(["export", summary["best_checkpoint"], "--out", str(out), "--merge"]) == 0
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(out)
    assert merged.model.layers[0].self_attn.q_proj.weight.dtype in (torch.float32, torch.bfloat16)
    assert any("mfu" not in m and "tokens_per_s_per_worker" in m for m in metrics(Path(summary["best_checkpoint"]).parent))


def test_lora_with_zero3_and_cpu_offload_exports_an_adapter(ray_local, tmp_path):
    """Also a base whose special tokens were never trained, as Llama 3 base ships them: their
    rows (sharded by ZeRO-3) train, the eos the data ends each answer with among them, and are
    saved with the adapter."""
    from tests.conftest import UNTRAINED, untrained_llama

    config = load_config(write_job(
        tmp_path, run_name="lora-zero3-offload", method="lora", lora={"loraplus_lr_ratio": 16},
        model={"name_or_path": str(untrained_llama(tmp_path / "base"))},
        distributed={"strategy": "deepspeed", "deepspeed": {"stage": 3, "offload_optimizer": "cpu"}},
        train={"max_steps": 2, "checkpoint_every": 2, "eval_every": 2, "peak_tflops": 1.0, "neftune_alpha": 5.0}))
    summary = run_training(config)  # NEFTune's noise on embeddings ZeRO-3 gathers in the module's forward
    assert summary["eval_loss_final"] < summary["eval_loss_initial"]
    logged = [m for m in metrics(Path(summary["best_checkpoint"]).parent) if "loss" in m]
    assert all(0 < m["mfu"] < 1 and m["tokens_per_s_per_worker"] > 0 for m in logged)
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    adapter = Path(summary["adapter_path"])
    base_path = json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"]
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_path), adapter)
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    # LoRA+ (ratio 16) through DeepSpeed's CPU Adam: from zero, two Adam steps at lr 2e-3 (the first
    # at half of it: warmup) move an entry at most about 0.003; at 16 times that rate some moved 0.016
    assert lora_b and max(p.abs().max().item() for p in lora_b) > 0.01
    assert json.loads((adapter / "adapter_config.json").read_text())["trainable_token_indices"] == {
        "embed_tokens": UNTRAINED, "lm_head": UNTRAINED}
    rows = {n.split(".")[-4]: p for n, p in model.named_parameters() if "trainable_tokens_delta" in n}
    assert rows["embed_tokens"].abs().amax(1).min() > 1e-3  # from the mean, not the base's zeros
    head = rows["lm_head"]  # the eos (row 0) trained away from the mean the others still hold
    assert (head[0] - head[1]).abs().max() > 1e-4 and torch.allclose(head[1], head[2])
