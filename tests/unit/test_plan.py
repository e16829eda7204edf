"""`ft-ray plan`: each part of a worker's memory by hand for the tiny model, ZeRO sharding and
offload, the suggestions, a sweep's worst case, and the peaks measured on an H100."""

import json
import re

import pytest

from ft_ray.cli import main
from ft_ray.config import config_from_dict
from ft_ray.plan import (ACTIVATION_MARGIN, KNOWN_SHAPES, MIB, QLORA_BYTES, Shape, describe, model_shape, plan_memory,
                         suggestions, teacher_pass, with_settings, worst_case)

H100_80GB = 80e9 / MIB


def job(**sections) -> object:
    raw = {"model": {"name_or_path": "builtin:tiny-llama", "max_seq_len": 256}, "data": {"train": "unused.jsonl"},
           "lora": {"rank": 8, "target_modules": ["q_proj", "v_proj"]}, "distributed": {"num_workers": 2},
           "train": {"micro_batch_size": 4}}
    for key, value in sections.items():
        raw[key] = {**raw.get(key, {}), **value} if isinstance(value, dict) else value
    return config_from_dict(raw)


def test_every_part_of_a_lora_worker_by_hand_for_the_tiny_model():
    config = job()
    shape, origin = model_shape(config)
    assert shape == Shape(hidden=128, intermediate=352, layers=4, heads=4, kv_heads=2, head_dim=32, vocab=768,
                          tied=False) and origin == "config.json"
    # q 128x128, k and v 128x64, o 128x128, gate and up 128x352, down 352x128; 9 norms; embeddings and lm_head
    params = 4 * (128 * 128 * 2 + 128 * 64 * 2 + 3 * 128 * 352) + 9 * 128 + 2 * 768 * 128
    adapters = 4 * 8 * ((128 + 128) + (128 + 64))  # rank 8 on q_proj and v_proj of 4 layers
    tokens = 4 * 256
    # per token and layer, fp32 on CPU: norms' inputs and outputs (4 x 128), q, k, v and the
    # attention output (128 + 2 x 64 + 128), lse (4 heads); gate, up, their product and the
    # unfused SwiGLU's act(gate) (4 x 352); the two adapters' rank-8 outputs
    layer = (4 * 128 + 128 + 2 * 64 + 128 + 4 * 352 + 2 * 8) * 4 + 4 * 4
    expected = {"base_weights": 4 * params, "lora_weights": 4 * adapters, "gradients": 4 * adapters,
                "optimizer_states": 8 * adapters, "activations": 4 * layer * ACTIVATION_MARGIN * tokens,
                # the chunked head's loss (fast_paths; one chunk here): fp32 logits, softmax, gradient;
                # the gradient of the head's input
                "logits_and_loss": tokens * 768 * (4 + 4 + 4) + tokens * 128 * 4}
    plan = plan_memory(config, shape)
    for part, value in expected.items():
        assert plan.parts[part] == pytest.approx(value / MIB), part
    assert plan.parts["cuda_context"] == 0  # a CPU job
    assert plan.allocated_mib == pytest.approx(sum(expected.values()) / MIB)
    assert plan.peak_mib == pytest.approx(plan.allocated_mib * 1.05)
    checkpointed = plan_memory(job(train={"gradient_checkpointing": True}), shape)
    assert checkpointed.parts["activations"] == pytest.approx((4 * 128 * 4 + layer * ACTIVATION_MARGIN) * tokens / MIB)


def test_added_tokens_train_the_embeddings_and_output_layer_whole_in_fp32():
    """`model.add_tokens` with LoRA and `model.new_tokens: whole`: embed_tokens and lm_head
    train in full (fp32 copies of the 16-bit base's, their gradients and Adam's two states), as
    `lora.modules_to_save` does; with `rows` (the default) only their rows train."""
    shape = Shape(4096, 14336, 32, 32, 8, 128, 128256, False)
    gpu = {"distributed": {"num_workers": 1, "use_gpu": True}, "train": {"precision": "bf16"}}
    plain = plan_memory(job(**gpu), shape)
    rows = plan_memory(job(**gpu, model={"add_tokens": ["<|house|>"]}), shape)
    assert rows.peak_mib == pytest.approx(plain.peak_mib)  # a row each in two matrices: under a MiB
    added = plan_memory(job(**gpu, model={"add_tokens": ["<|house|>"], "new_tokens": "whole"}), shape)
    saved = plan_memory(job(**gpu, lora={"modules_to_save": ["embed_tokens", "lm_head"]}), shape)
    whole = 2 * 128256 * 4096
    for part, bytes_each in (("lora_weights", 4), ("gradients", 4), ("optimizer_states", 8)):
        assert added.parts[part] == pytest.approx(plain.parts[part] + bytes_each * whole / MIB), part
        assert saved.parts[part] == pytest.approx(added.parts[part]), part


def test_without_liger_the_head_s_loss_holds_one_chunk_of_logits_and_the_swiglu_product_is_recomputed():
    shape = Shape(4096, 14336, 32, 32, 8, 128, 128256, False)  # Llama 3 8B's vocabulary
    tokens, rows = 4 * 2048, 256 * 2 ** 20 // (4 * 128256)  # fast_paths.LOGITS_CHUNK_BYTES of fp32 logits
    chunked = plan_memory(job(model={"max_seq_len": 2048}), shape).parts["logits_and_loss"]
    assert chunked == pytest.approx((rows * 128256 * 12 + tokens * 4096 * 4) / MIB)  # fp32 on a CPU
    whole = plan_memory(job(model={"max_seq_len": 2048}, train={"fused_kernels": "none"}), shape)
    assert whole.parts["logits_and_loss"] == pytest.approx(tokens * 128256 * 12 / MIB)
    # Gemma 2 caps its logits (config.json's final_logit_softcapping): its own forward, whole logits
    from transformers import AutoConfig

    capped = Shape.of(AutoConfig.for_model("gemma2", vocab_size=128256))
    assert capped.scaled_logits and not Shape.of(AutoConfig.for_model("llama")).scaled_logits
    assert plan_memory(job(model={"max_seq_len": 2048}), capped).parts["logits_and_loss"] == pytest.approx(
        tokens * 128256 * 12 / MIB)
    full = plan_memory(job(method="full", model={"max_seq_len": 2048}), shape).parts["logits_and_loss"]
    assert full == pytest.approx(chunked + 128256 * 4096 * 4 / MIB)  # the head's fp32 gradient, taken in forward
    kept = plan_memory(job(method="full", model={"max_seq_len": 2048}, train={"recompute_swiglu": False}), shape)
    recomputed = plan_memory(job(method="full", model={"max_seq_len": 2048}), shape)
    # act(gate) and the product, 2 x 14336 fp32 values per token and layer, not saved
    saved = (kept.parts["activations"] - recomputed.parts["activations"]) * MIB
    assert saved == pytest.approx(32 * 2 * 14336 * 4 * ACTIVATION_MARGIN * tokens)


def test_an_inline_preference_reference_adds_a_frozen_copy_of_the_base_to_a_full_fine_tune():
    shape = Shape(4096, 14336, 32, 32, 8, 128, 128256, False)
    full = {"method": "full", "objective": "dpo", "distributed": {"num_workers": 4, "use_gpu": True},
            "train": {"precision": "bf16"}}
    inline = plan_memory(job(**full, preference={"reference": "inline"}), shape)
    assert inline.parts["reference_weights"] == pytest.approx(4 * shape.params / MIB)  # loaded in fp32
    sharded = plan_memory(job(**{**full, "distributed": {"num_workers": 4, "use_gpu": True, "strategy": "deepspeed",
                                                         "deepspeed": {"stage": 3}}}, preference={"reference": "inline"}),
                          shape)
    assert sharded.parts["reference_weights"] == pytest.approx(2 * shape.params / 4 / MIB)  # bf16, a quarter each
    fsdp = plan_memory(job(**{**full, "distributed": {"num_workers": 4, "use_gpu": True, "strategy": "fsdp"}},
                           preference={"reference": "inline"}), shape)
    assert fsdp.parts["reference_weights"] == sharded.parts["reference_weights"]  # fsdp shards it alike
    precomputed = plan_memory(job(**full), shape)  # the default: the log-probs come with the data
    adapter_off = plan_memory(job(objective="kto", preference={"reference": "inline"}), shape)  # LoRA: no copy
    assert "reference_weights" not in precomputed.parts and "reference_weights" not in adapter_off.parts
    assert inline.peak_mib > precomputed.peak_mib + 4 * shape.params / MIB


def test_grpo_plans_its_sampled_answers_and_its_reference():
    shape = Shape(4096, 14336, 32, 32, 8, 128, 128256, False)
    gpu = {"distributed": {"num_workers": 1, "use_gpu": True}, "model": {"max_seq_len": 1024},
           "train": {"precision": "bf16", "micro_batch_size": 2}}
    sft = plan_memory(job(**gpu), shape)
    grpo = plan_memory(job(**gpu, objective="grpo", grpo={"num_generations": 8, "max_new_tokens": 512}), shape)
    assert grpo.tokens_per_micro_batch == 2 * 8 * (1024 + 512)  # the loss forward's rows: 8 answers per prompt, after their prompt
    assert grpo.parts["activations"] == pytest.approx(sft.parts["activations"] * 8 * 1.5)
    assert "reference_weights" not in grpo.parts  # beta 0: no reference
    full = plan_memory(job(**gpu, method="full", objective="grpo", grpo={"beta": 0.04}), shape)
    assert full.parts["reference_weights"] == pytest.approx(4 * shape.params / MIB)


def test_grpo_plans_each_reward_model_every_worker_loads(tmp_path):
    from tests.conftest import tiny_reward_model

    folder = tiny_reward_model(tmp_path / "rm")
    shape = Shape(4096, 14336, 32, 32, 8, 128, 128256, False)
    # the built-in Llama's shape as a sequence classifier: its output layer (768 x 128) is not there
    scorer = 4 * (128 * 128 * 2 + 128 * 64 * 2 + 3 * 128 * 352) + 9 * 128 + 768 * 128
    for gpu, size in ((False, 4), (True, 2)):
        grpo = {"objective": "grpo", "distributed": {"num_workers": 1, "use_gpu": gpu}}
        alone = plan_memory(job(**grpo), shape)
        scored = plan_memory(job(**grpo, grpo={"rewards": {f"model:{folder}": 1.0, "chrf": 1.0}}), shape)
        assert "reward_models" not in alone.parts
        assert scored.parts["reward_models"] == pytest.approx(size * scorer / MIB)
        assert scored.parts["reward_scoring"] == 0  # an 8B policy's activations hold more than the scoring forward
        assert scored.allocated_mib == pytest.approx(alone.allocated_mib + size * scorer / MIB)
    # a small policy with gradient checkpointing: the scoring forward of 16 answers (no gradients: one
    # layer's hidden states, q, k, v, attention output, gate, up, product) is the peak, not the loss forward
    small = Shape(64, 128, 2, 4, 2, 16, 800, True)
    setting = {"objective": "grpo", "distributed": {"num_workers": 1, "use_gpu": True},
               "train": {"micro_batch_size": 2, "gradient_checkpointing": True, "precision": "bf16"},
               "grpo": {"rewards": {f"model:{folder}": 1.0}, "num_generations": 8, "max_new_tokens": 64}}
    scored = plan_memory(job(**setting), small)
    scoring = 16 * (256 + 64) * (2 * 128 + 2 * 128 + 2 * 64 + 3 * 352) * 2 / MIB
    assert scored.parts["reward_scoring"] == pytest.approx(
        scoring - scored.parts["activations"] - scored.parts["logits_and_loss"])
    assert scored.parts["reward_scoring"] > 0


def test_distillation_plans_the_teacher_every_worker_holds_whole_or_sharded_beside_the_student():
    from ft_ray.plan import KNOWN_SHAPES

    student, teacher = KNOWN_SHAPES["meta-llama/Llama-3.1-8B"], KNOWN_SHAPES["meta-llama/Meta-Llama-3-70B"]
    gpu = {"distributed": {"num_workers": 4, "use_gpu": True}, "train": {"precision": "bf16", "micro_batch_size": 4}}
    distill = {"objective": "distill", "distill": {"teacher": "meta-llama/Llama-3.1-70B-Instruct"}}
    for method in ("lora", "qlora"):
        alone = plan_memory(job(**gpu, method=method), student)
        taught = plan_memory(job(**gpu, **distill, method=method), student)
        linear = teacher.layers * teacher.layer_linear_params
        weights = 2 * teacher.params if method == "lora" else (  # 4-bit linear layers, the rest in bf16 (not fp32)
            linear * QLORA_BYTES[True] + 2 * (teacher.params - linear))
        assert taught.parts["teacher_weights"] == pytest.approx(weights / MIB)
        # its forward: no gradients, one layer's tensors at a time and its last hidden states at the 1,024 tokens;
        # the divergence's fp32 logits and softmaxes over one chunk of rows of the head (523 of them)
        layer = 2 * 8192 + 2 * 8192 + 2 * 1024 + 3 * 28672
        rows = 256 * 2 ** 20 // (4 * 128256)
        assert taught.parts["teacher_forward"] == pytest.approx((1024 * (layer + 8192) * 2 + rows * 128256 * 24) / MIB)
        assert {part: mib for part, mib in taught.parts.items() if not part.startswith("teacher")} == pytest.approx(
            alone.parts | {"allocator_slack": taught.parts["allocator_slack"]})
    assert 35 * 1024 < taught.parts["teacher_weights"] < 38 * 1024  # 70B in 4 bits
    # on-policy batches: each prompt (up to max_seq_len) with its sampled answer after it
    sampled = plan_memory(job(**gpu, objective="distill", method="qlora", distill={
        **distill["distill"], "on_policy": 0.5, "max_new_tokens": 256}), student)
    assert sampled.tokens_per_micro_batch == 4 * (256 + 256) and sampled.parts["activations"] == 2 * taught.parts["activations"]
    assert taught.fits(H100_80GB) and not plan_memory(job(**gpu, **distill, method="lora"), student).fits(H100_80GB)
    # its logits precomputed: no teacher on the workers, the student's parts as without one; the teacher pass
    # before training holds it whole on each model actor (in bf16 under LoRA: 70B does not fit 80 GB)
    precomputed = job(**gpu, objective="distill", method="lora", distill={**distill["distill"],
                                                                          "teacher_logits": "precomputed"})
    ahead = plan_memory(precomputed, student)
    assert ahead.parts == plan_memory(job(**gpu, method="lora"), student).parts and ahead.fits(H100_80GB)
    teacher_run = teacher_pass(precomputed)
    assert teacher_run.parts["teacher_weights"] == pytest.approx(2 * teacher.params / MIB)
    assert teacher_run.parts["teacher_forward"] == taught.parts["teacher_forward"]
    assert not teacher_run.fits(H100_80GB) and teacher_pass(job(**gpu, **distill, method="lora")) is None
    # under fsdp (and ZeRO-3) the teacher is sharded as the student is: a 70B teacher in bf16 over 8 workers, which
    # no worker could hold whole, a share of its weights, its own forward's logits over every token, its gathered layers
    fsdp = {"distributed": {"num_workers": 8, "use_gpu": True, "strategy": "fsdp"}, "train": gpu["train"]}
    sharded = plan_memory(job(**fsdp, **distill, method="lora"), student)
    assert sharded.parts["teacher_weights"] == pytest.approx(2 * teacher.params / 8 / MIB)
    gathered = 2 * (2 * 128256 * 8192 + 8192 + 2 * (teacher.params - 2 * 128256 * 8192 - 8192) / 80)
    assert sharded.parts["teacher_forward"] == pytest.approx(taught.parts["teacher_forward"] + (
        1024 * 128256 * 2 + (1024 - rows) * 128256 * 24 + gathered) / MIB)
    assert sharded.fits(H100_80GB)
    zero3 = {**fsdp, "distributed": {**fsdp["distributed"], "strategy": "deepspeed", "deepspeed": {"stage": 3}}}
    assert plan_memory(job(**zero3, **distill, method="lora"), student).parts["teacher_weights"] == pytest.approx(
        sharded.parts["teacher_weights"])
    # one fsdp worker holds the teacher whole, yet runs it as a sharded one: its own forward's logits and layers
    alone = plan_memory(job(**{**fsdp, "distributed": {**fsdp["distributed"], "num_workers": 1}}, **distill,
                            method="lora"), student)
    assert alone.parts["teacher_weights"] == pytest.approx(2 * teacher.params / MIB)
    assert alone.parts["teacher_forward"] == pytest.approx(sharded.parts["teacher_forward"])


def test_the_command_plans_a_teacher_run_before_training_and_exits_2_when_it_does_not_fit(tmp_path, capsys,
                                                                                          monkeypatch):
    import yaml

    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job(objective="distill", distributed={"use_gpu": True}, train={"precision": "bf16"},
                                       distill={"teacher": "meta-llama/Meta-Llama-3-70B",
                                                "teacher_logits": "precomputed"}).model_dump(mode="json")))
    assert main(["plan", str(path), "--gpu-memory", "80"]) == 2  # the workers' part fits
    out = capsys.readouterr().out
    assert "fits a 80 GB GPU (74.5 GiB)" in out
    assert re.search(r"teacher pass before training \(distill.teacher_logits: precomputed\), per model actor: "
                     r"teacher 134,\d{3} MiB, its forward [\d,]+ MiB, peak [\d,]+ MiB \(does NOT fit a 80 GB GPU\)", out)
    assert main(["plan", str(path), "--gpu-memory", "80", "--json", "--set", "method=qlora"]) == 0
    assert json.loads(capsys.readouterr().out)["teacher_pass_fits"] is True  # 4 bits: about 37 GiB
    # `ft-ray submit` refuses it on a cluster of H100s (its fit check)
    from ft_ray import plan
    from ft_ray.config import load_config

    monkeypatch.setattr(plan, "cluster_nodes", lambda address: [{"GPU": 8, "accelerator_type:H100": 1}])
    fits, line = plan.cluster_fit(load_config(path), "http://head:8265")
    assert not fits and re.fullmatch(r"plan: peak 14\d\.\d GiB per model actor of the teacher pass; the cluster's "
                                     r"smallest GPU \(H100\) has 74\.5 GiB", line), line


def test_a_reward_model_plans_its_score_head_instead_of_the_output_layer_and_its_logits():
    shape = Shape(4096, 14336, 32, 32, 8, 128, 128256, False)
    full = {"method": "full", "distributed": {"num_workers": 1, "use_gpu": True}, "model": {"max_seq_len": 1024}}
    dpo = plan_memory(job(**full, objective="dpo"), shape)
    scorer = plan_memory(job(**full, objective="reward_model"), shape)
    assert scorer.parts["weights"] == pytest.approx(dpo.parts["weights"] - 4 * shape.embedding_params / MIB)
    assert scorer.parts["logits_and_loss"] == pytest.approx(4 * 1024 * 4 * 2 / MIB)  # a score per token, and its gradient
    from ft_ray.plan import plan_time

    # time: FLOPs per token without the output layer's matmul (2 x 128256 x 4096 forward, twice that backward)
    speeds = [plan_time(job(**full, objective=o), shape, 10 ** 6, "H100")["tokens_per_s_per_worker"]
              for o in ("dpo", "reward_model")]
    flops = 6 * (shape.params - shape.embedding_params) + 12 * 32 * 4096 * 1024
    assert speeds[1] / speeds[0] == pytest.approx(flops / (flops - 6 * shape.embedding_params), rel=1e-4)


def test_zero_stages_shard_and_offload_what_they_say():
    shape = Shape(4096, 14336, 32, 32, 8, 128, 128256, False)  # Llama 3 8B
    n = shape.params
    full = {"method": "full", "distributed": {"num_workers": 4, "use_gpu": True, "strategy": "deepspeed"},
            "train": {"precision": "bf16"}}
    stage = {s: plan_memory(job(**{**full, "distributed": {**full["distributed"], "deepspeed": {"stage": s}}}), shape)
             for s in (0, 1, 2, 3)}
    assert stage[0].parts["optimizer_states"] == pytest.approx(8 * n / MIB)
    assert stage[1].parts["optimizer_states"] == pytest.approx(8 * n / 4 / MIB)  # stage 1: optimizer sharded
    assert stage[1].parts["master_weights"] == pytest.approx(4 * n / 4 / MIB)
    assert stage[1].parts["gradients"] == pytest.approx(2 * n / MIB)
    assert stage[2].parts["gradients"] == pytest.approx(2 * n / 4 / MIB)  # stage 2: + gradients
    assert stage[2].parts["weights"] == pytest.approx(2 * n / MIB)
    assert stage[3].parts["weights"] == pytest.approx(2 * n / 4 / MIB)  # stage 3: + parameters
    offloaded = plan_memory(job(**{**full, "distributed": {**full["distributed"], "deepspeed": {
        "stage": 3, "offload_optimizer": "cpu", "offload_params": "cpu"}}}), shape)
    assert offloaded.parts["optimizer_states"] == offloaded.parts["master_weights"] == offloaded.parts["weights"] == 0
    # built partitioned (distributed.deepspeed.zero3_init); else DeepSpeed moves the whole model, in bf16, to each
    # GPU before it partitions it: the peak as the job starts (QLoRA's 4-bit model is whole there from its load)
    assert stage[3].startup_mib == 0 and stage[3].peak_mib == sum(stage[3].parts.values())
    whole = plan_memory(job(**{**full, "distributed": {**full["distributed"], "deepspeed": {
        "stage": 3, "zero3_init": False}}}), shape)
    assert whole.startup_mib == pytest.approx(2 * n / MIB + 600)
    assert "ZeRO-3 partitions it, the whole model on each GPU: 15,917 MiB (distributed.deepspeed.zero3_init: false)" in (
        describe(job(**{**full, "distributed": {**full["distributed"], "deepspeed": {"stage": 3, "zero3_init": False}}}),
                 whole))
    qlora = plan_memory(job(**{**full, "method": "qlora", "quantization": {"quant_storage": "bfloat16"},
                               "distributed": {**full["distributed"], "deepspeed": {"stage": 3}}}), shape)
    assert qlora.startup_mib == pytest.approx(qlora.parts["base_weights"] * 4 + 600)
    small = plan_memory(job(**{**full, "distributed": {**full["distributed"], "num_workers": 16, "deepspeed": {
        "stage": 3, "zero3_init": False}}, "train": {"precision": "bf16", "micro_batch_size": 1}}), shape)
    assert small.peak_mib == small.startup_mib > sum(small.parts.values())  # 16 workers' shards: the start is the peak


def test_fsdp_shards_weights_gradients_and_states_and_holds_the_layers_it_gathers():
    """As ZeRO-3, plus the layers gathered in the compute dtype: the embeddings and output
    layer all along and two decoder layers (the one running, the next prefetched), or every
    layer from forward to backward without reshard_after_forward, or while GRPO generates (as
    ZeRO-3 then). Autocast makes no copies of its own: the gathered weights are 16-bit already; QLoRA's are
    gathered as stored. An 8B full fine-tune fits 4 x 80 GB (and is offered to a DDP job that
    does not fit); an elastic range is planned at its fewest workers."""
    shape = Shape(4096, 14336, 32, 32, 8, 128, 128256, False)  # Llama 3 8B
    n, outer = shape.params, 2 * 128256 * 4096 + 4096  # embeddings, output layer, final norm
    full = {"method": "full", "distributed": {"num_workers": 4, "use_gpu": True, "strategy": "fsdp"},
            "train": {"precision": "bf16", "gradient_checkpointing": True}}
    plan = plan_memory(job(**full), shape)
    sharded = {"weights": 4 * n / 4, "gradients": 4 * n / 4, "optimizer_states": 8 * n / 4,
               "gathered_weights": 2 * (outer + 2 * (n - outer) / 32)}
    for part, value in sharded.items():
        assert plan.parts[part] == pytest.approx(value / MIB), part
    assert "weight_copies" not in plan.parts and plan.fits(H100_80GB)
    elastic = plan_memory(job(**{**full, "distributed": {**full["distributed"], "num_workers": [4, 8]}}), shape)
    assert elastic.parts == plan.parts  # planned at its fewest workers: the least sharded
    kept = plan_memory(job(**{**full, "distributed": {**full["distributed"], "fsdp": {"reshard_after_forward": False}}}),
                       shape)
    assert kept.parts["gathered_weights"] == pytest.approx(2 * n / MIB)
    sampling = plan_memory(job(**{**full, "objective": "grpo", "data": {"train": "t.jsonl", "format": "completion"},
                                  "grpo": {"rewards": {"chrf": 1}}}), shape)
    assert sampling.parts["gathered_weights"] == kept.parts["gathered_weights"]  # GRPO generates from all of it
    zero3 = {"distributed": {**full["distributed"], "strategy": "deepspeed", "deepspeed": {"stage": 3}}}
    assert "gathered_weights" not in plan_memory(job(**{**full, **zero3}), shape).parts  # (ZeRO's buckets: not counted)
    sampling = plan_memory(job(**{**full, **zero3, "objective": "grpo", "data": {"train": "t.jsonl", "format": "completion"},
                                  "grpo": {"rewards": {"chrf": 1}}}), shape)
    assert sampling.parts["gathered_weights"] == kept.parts["gathered_weights"]  # as under fsdp
    ddp = job(**{**full, "distributed": {**full["distributed"], "strategy": "ddp"}})
    assert not plan_memory(ddp, shape).fits(H100_80GB)
    offered = [settings for settings, _ in suggestions(ddp, shape, H100_80GB)]  # the DDP job is told what fits
    assert any(settings.endswith(", distributed.strategy=fsdp") for settings in offered), offered  # (no ZeRO key)
    lora = plan_memory(job(**{**full, "method": "lora"}), shape)
    assert lora.parts["base_weights"] == pytest.approx(2 * n / 4 / MIB)
    assert lora.parts["lora_weights"] == pytest.approx(lora.parts["gradients"])  # both a quarter of the adapters
    qlora = plan_memory(job(**{**full, "method": "qlora", "quantization": {"quant_storage": "bfloat16"}}), shape)
    layer = shape.layer_linear_params * QLORA_BYTES[True] + 4 * 2 * 4096  # 4-bit linear layers, fp32 norms
    assert qlora.parts["gathered_weights"] == pytest.approx((4 * outer + 2 * layer) / MIB)  # gathered as stored


# Peak GPU memory (torch.cuda.max_memory_allocated) of ft-ray's step in bench/RESULTS.md,
# "GPU, session 9" (2026-11-26, one H100 80GB, `bash bench/gpu.sh`): a 1B Llama shape
# (bench/train.py LLAMA_1B, vocab 32000, tied embeddings), bf16, 8 sequences of 2048 tokens per
# step, LoRA rank 16 on all linear layers, fused kernels (liger) on, no gradient checkpointing.
MEASURED_1B_MIB = {"full": 36_034, "lora": 28_771, "qlora": 27_708}


@pytest.mark.parametrize("method", MEASURED_1B_MIB)
def test_within_15_percent_of_the_peaks_measured_on_an_h100(method):
    shape = Shape(2048, 8192, 16, 32, 8, 64, 32000, True)
    config = job(method=method, model={"max_seq_len": 2048},
                 lora={"rank": 16, "alpha": 32, "dropout": 0.0, "target_modules": "all-linear"},
                 quantization={"compute_dtype": "bfloat16"}, distributed={"num_workers": 1, "use_gpu": True},
                 train={"micro_batch_size": 8, "precision": "bf16"})
    planned = plan_memory(config, shape).allocated_mib
    assert planned == pytest.approx(MEASURED_1B_MIB[method], rel=0.15), f"{planned:.0f} MiB planned"


def test_what_would_fit_comes_cheapest_first():
    shape = Shape(4096, 14336, 32, 32, 8, 128, 128256, False)
    config = job(method="full", model={"max_seq_len": 2048},
                 distributed={"num_workers": 4, "use_gpu": True}, train={"micro_batch_size": 4, "precision": "bf16"})
    assert not plan_memory(config, shape).fits(H100_80GB)
    fixes = suggestions(config, shape, H100_80GB)
    assert fixes and all(plan.fits(H100_80GB) for _, plan in fixes)
    first = fixes[0][0]
    assert first.startswith("train.micro_batch_size=1, train.gradient_accumulation=4, "
                            "train.gradient_checkpointing=true"), first  # the batch first, then checkpointing
    assert [p.peak_mib for _, p in fixes] == sorted((p.peak_mib for _, p in fixes), reverse=True)
    assert all("train.optimizer" not in settings for settings, _ in fixes)  # the job's AdamW, not set again


def test_8bit_adamw_is_offered_where_its_states_make_a_job_fit():
    """A full fine-tune of a 3B model on one 48 GB GPU: its fp32 AdamW states (8 bytes per
    weight) do not fit, bitsandbytes' 8-bit ones (about 2) do, before any DeepSpeed offload;
    the same for ZeRO-3's shards of an 8B model's states, and after DeepSpeed's offload of
    the optimizer FSDP2's of everything (`distributed.fsdp.offload`)."""
    shape = Shape(3072, 8192, 28, 24, 8, 128, 128256, True)
    config = job(method="full", model={"max_seq_len": 4096}, distributed={"num_workers": 1, "use_gpu": True},
                 train={"micro_batch_size": 1, "precision": "bf16", "gradient_checkpointing": True})
    gpu = 48e9 / MIB
    assert not plan_memory(config, shape).fits(gpu)
    (first, plan), *_ = suggestions(config, shape, gpu)
    assert first == "train.optimizer=adamw_8bit" and plan.fits(gpu)
    assert plan.parts["optimizer_states"] == pytest.approx(plan_memory(config, shape).parts["optimizer_states"] / 3.94,
                                                           rel=1e-3)  # 8 bytes -> 2 + 2 x 4 / 256
    # an 8B full fine-tune under ZeRO-3 on two 48 GB GPUs: the 8-bit states of its shards, before the CPU offload
    zero3 = job(method="full", model={"max_seq_len": 2048}, distributed={
        "num_workers": 2, "use_gpu": True, "strategy": "deepspeed", "deepspeed": {"stage": 3}},
                train={"micro_batch_size": 1, "precision": "bf16", "gradient_checkpointing": True})
    shape = Shape(4096, 14336, 32, 32, 8, 128, 128256, False)
    assert not plan_memory(zero3, shape).fits(gpu)
    found = suggestions(zero3, shape, gpu)
    assert [settings for settings, _ in found] == [
        "train.optimizer=adamw_8bit", "distributed.deepspeed.offload_optimizer=cpu",
        "distributed.strategy=fsdp, distributed.fsdp.offload=cpu"]
    # DeepSpeed's CPU AdamW: fp32 weights, gradients and AdamW states of each worker's partition in CPU memory
    assert found[1][1].offloaded_mib == pytest.approx(16 * shape.params / 2 / MIB)
    # FSDP2 offloading its shards: the GPU holds the layers gathered for the forward and backward, the activations;
    # the CPU its shards of the fp32 weights, their gradients and AdamW's states
    offloaded = found[2][1]
    assert offloaded.parts["weights"] == offloaded.parts["gradients"] == offloaded.parts["optimizer_states"] == 0
    assert offloaded.parts["gathered_weights"] > 0 and offloaded.peak_mib < found[1][1].peak_mib
    assert offloaded.offloaded_mib == pytest.approx((4 + 4 + 8) * shape.params / 2 / MIB)
    fsdp_job = with_settings(zero3, ["distributed.strategy=fsdp", "distributed.fsdp.offload=cpu"])
    assert "and in CPU memory (offload): 61,266 MiB per worker, 119.7 GiB for the 2 worker(s)" in describe(
        fsdp_job, plan_memory(fsdp_job, shape))


def test_a_sweep_is_planned_at_its_largest_trial():
    config = job(tune={"search_space": {"lora.rank": {"choice": [4, 64]}, "train.learning_rate": {
        "loguniform": [1e-5, 1e-3]}}})
    shape, _ = model_shape(config)
    trial, plan = worst_case(config, shape)
    assert trial.lora.rank == 64 and plan.peak_mib == plan_memory(job(lora={"rank": 64}), shape).peak_mib


def test_the_command_says_whether_it_fits_and_exits_2_when_not(tmp_path, capsys):
    import yaml

    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job().model_dump(mode="json")))
    assert main(["plan", str(path), "--gpu-memory", "24"]) == 0
    out = capsys.readouterr().out
    assert "frozen base weights" in out and "fits a 24 GB GPU" in out
    assert main(["plan", str(path), "--gpu-memory", "0.01", "--json"]) == 2
    report = json.loads(capsys.readouterr().out)
    assert report["fits"] is False and report["peak_mib"] > 0.01e9 / MIB
    assert set(report["parts_mib"]) >= {"activations", "logits_and_loss", "base_weights"}


def test_time_and_cost_from_the_measured_mfu_add_up(tmp_path, capsys):
    import yaml

    from ft_ray.plan import MEASURED_MFU, plan_time

    shape = Shape(4096, 14336, 32, 32, 8, 128, 128256, False)  # Llama 3 8B, QLoRA rank 16 on every linear
    config = job(method="qlora", model={"max_seq_len": 2048}, lora={"rank": 16, "target_modules": "all-linear"},
                 distributed={"num_workers": 4, "use_gpu": True},
                 train={"micro_batch_size": 4, "gradient_accumulation": 8, "precision": "bf16"})
    time = plan_time(config, shape, 50_000_000, "H100")
    assert time["tokens_per_step"] == 4 * 2048 * 8 * 4 and time["steps"] == 191  # ceil(50M / 262,144)
    adapter = 32 * 16 * (2 * (4096 + 4096) + 2 * (4096 + 1024) + 3 * (4096 + 14336))
    flops = 4 * (shape.params - shape.embedding_params) + 12 * 32 * 4096 * 2048 + 6 * adapter
    per_gpu = MEASURED_MFU["qlora"] * 989e12 / flops
    assert time["tokens_per_s_per_worker"] == round(per_gpu)
    assert time["hours"] == pytest.approx(191 * 262_144 / (4 * per_gpu) / 3600, abs=0.01)
    assert time["gpu_hours"] == pytest.approx(4 * time["hours"], abs=0.02)

    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job(distributed={"use_gpu": True}).model_dump(mode="json")))
    assert main(["plan", str(path), "--train-tokens", "1000000000", "--price-per-gpu-hour", "2"]) == 0
    line = capsys.readouterr().out.splitlines()[-1]
    assert line.startswith("time: about ") and "GPU-hours; $" in line and "tokens from --train-tokens" in line
    for same in ("1e9", "1B", "1000M", "1_000_000_000"):
        assert main(["plan", str(path), "--train-tokens", same, "--price-per-gpu-hour", "2"]) == 0
        assert capsys.readouterr().out.splitlines()[-1] == line, same
    with pytest.raises(SystemExit) as refused:
        main(["plan", str(path), "--train-tokens", "lots"])
    assert refused.value.code == 2 and "'lots' is not a number of tokens" in capsys.readouterr().err


def test_small_trials_share_a_gpu_and_jobs_of_several_workers_do_not():
    from ft_ray.config import ConfigError
    from ft_ray.plan import gpu_share

    assert gpu_share(7_000, 22_888)[0] == pytest.approx(1 / 3)  # 3 trials of 6.8 GiB on a 24 GB card
    assert gpu_share(30_000, 22_888)[0] == 1.0
    assert job(distributed={"num_workers": 1, "use_gpu": True, "gpus_per_worker": 0.25}).distributed.gpu_share == 0.25
    with pytest.raises((ConfigError, ValueError), match="only one-worker jobs"):
        job(distributed={"num_workers": 2, "use_gpu": True, "gpus_per_worker": 0.5})


def test_a_sweep_of_small_trials_takes_a_share_of_each_gpu_and_runs_that_many_more():
    from ft_ray.plan import gpu_share
    from ft_ray.tune import concurrency, with_gpu_share

    nodes = [{"CPU": 8, "GPU": 1, "accelerator_type:A10G": 1}] * 2  # Ray's total resources of 2 nodes
    sweep = job(distributed={"num_workers": 1, "use_gpu": True, "gpus_per_worker": "auto"},
                tune={"num_samples": 100, "search_space": {"lora.rank": {"choice": [4, 16]}}})
    shared = with_gpu_share(sweep, nodes)
    share = gpu_share(worst_case(sweep, model_shape(sweep)[0])[1].peak_mib, 24e9 / MIB)[0]
    assert share < 1 and shared.distributed.gpus_per_worker == pytest.approx(share)
    assert concurrency(shared, False, {"CPU": 16, "GPU": 2}) == round(2 / share)  # every share of both GPUs
    two_workers = job(distributed={"num_workers": 2, "use_gpu": True, "gpus_per_worker": "auto"},
                      tune={"search_space": {"lora.rank": {"choice": [4]}}})
    assert with_gpu_share(two_workers, nodes).distributed.gpus_per_worker == 1.0


def test_a_cluster_without_gpus_up_or_of_unknown_type_is_not_held_against_the_job():
    from ft_ray.plan import fit_line

    plan = plan_memory(job(distributed={"use_gpu": True}), model_shape(job())[0])
    assert fit_line(plan, [("A10G", 22_888.0), ("H100", 76_294.0)]) == (
        True, f"plan: peak {plan.peak_mib / 1024:.1f} GiB per worker; the cluster's smallest GPU (A10G, H100) has 22.4 GiB")
    assert not fit_line(plan, [("T4", plan.peak_mib - 1)])[0]
    fits, line = fit_line(plan, [])  # an autoscaling cluster whose GPU nodes start with the job
    assert fits and "no GPU node is up on the cluster now" in line
    fits, line = fit_line(plan, [("B300", 0.0)])
    assert fits and "(B300) is unknown to ft-ray" in line


def saved_for_backward(config, tokens: int) -> float:
    """Bytes the decoder layers keep for backward per token and layer in ft-ray's forward (on
    CPU): the storages autograd saves inside them that are not weights."""
    import torch

    from ft_ray.models import causal_lm
    from ft_ray.train.engines import DDPEngine
    from ft_ray.train.modeling import build_model
    from ft_ray.train.objectives import build_objective

    model = build_model(config, config.model.name_or_path)
    engine = DDPEngine(model, config, total_steps=1, objective=build_objective(config, model))
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights:
            seen[storage.data_ptr()] = storage.nbytes()
        return tensor

    layers = causal_lm(model).model.layers
    hooks = []
    for layer in layers:
        context = torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor)
        hooks += [layer.register_forward_pre_hook(lambda *_, c=context: c.__enter__()),
                  layer.register_forward_hook(lambda *_, c=context: c.__exit__(None, None, None))]
    ids = torch.randint(3, 700, (1, tokens))
    engine.forward_loss({"input_ids": ids, "labels": ids, "position_ids": torch.arange(tokens)[None]})
    return sum(seen.values()) / tokens / len(layers)


def test_a_mixture_of_experts_counts_its_experts_weights_adapters_and_what_they_keep(tmp_path):
    """A mixture of experts (a tiny Qwen3-MoE: 4 experts, 2 per token): its weights as the
    model has them, the adapters as PEFT makes them (LoRA on the fused expert weights: rank per
    expert, doubled on gate and up by transformers 4's names), QLoRA's experts 16-bit, PEFT's
    copy of each layer's experts with B @ A added, and the activations within 20% of what
    ft-ray's forward keeps (measured on CPU; no GPU measurement yet). Models it does not know
    (latent attention with a sparse attention indexer) are said."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from ft_ray.config import InputError
    from ft_ray.models import apply_lora, load_base_model
    from ft_ray.plan import QLORA_BYTES, activation_bytes, adapter_params
    from tests.conftest import tiny_moe

    folder = tiny_moe(tmp_path / "moe").name_or_path
    config = job(model={"name_or_path": folder}, lora={"dropout": 0.0, "target_modules": "all-linear"},
                 distributed={"num_workers": 1}, train={"precision": "bf16", "micro_batch_size": 1})
    shape, _ = model_shape(config)
    assert (shape.experts, shape.experts_per_token, shape.expert_intermediate, shape.intermediate) == (4, 2, 32, 0)
    real = AutoModelForCausalLM.from_pretrained(folder)
    assert shape.params == sum(p.numel() for p in real.parameters())  # q's and k's norms included
    for targets in ("all-linear", ["q_proj", "gate_up_proj", "down_proj"], ["q_proj", "gate_proj", "up_proj", "down_proj"]):
        lora = config.lora.model_copy(update={"target_modules": targets})
        adapted = apply_lora(load_base_model(config.model), lora, folder)
        trained = sum(p.numel() for p in adapted.parameters() if p.requires_grad)
        assert adapter_params(config.model_copy(update={"lora": lora}), shape) == trained, targets

    experts = shape.layers * shape.layer_expert_params  # 2 x (4 x (64 x 64 + 32 x 64) + 4 x 64)
    assert experts == 2 * (4 * (64 * 64 + 32 * 64) + 4 * 64)
    qlora = plan_memory(job(**{**config.model_dump(mode="json"), "method": "qlora"}), shape)
    linear = shape.layers * shape.layer_linear_params
    assert qlora.parts["base_weights"] * MIB == pytest.approx(
        linear * QLORA_BYTES[True] + 2 * experts + 4 * (shape.params - linear - experts))
    assert qlora.parts["expert_weight_copies"] * MIB == 2 * experts
    checkpointed = plan_memory(job(**{**config.model_dump(mode="json"), "train": {
        **config.train.model_dump(), "gradient_checkpointing": True}}), shape)
    assert checkpointed.parts["expert_weight_copies"] * MIB == 2 * experts / shape.layers
    attention_only = job(**{**config.model_dump(mode="json"), "lora": {"dropout": 0.0, "target_modules": ["q_proj"]}})
    assert "expert_weight_copies" not in plan_memory(attention_only, shape).parts

    for trained in (attention_only, job(**{**config.model_dump(mode="json"), "lora": {
            "dropout": 0.0, "target_modules": ["q_proj", "gate_up_proj", "down_proj"]}})):
        planned = activation_bytes(trained, shape, 2) / shape.layers
        planned += plan_memory(trained, shape).parts.get("expert_weight_copies", 0) * MIB / 256 / shape.layers
        assert saved_for_backward(trained, 256) == pytest.approx(planned, rel=0.2)

    AutoConfig.for_model("deepseek_v32", n_routed_experts=4, kv_lora_rank=16).save_pretrained(tmp_path / "sparse")
    with pytest.raises(InputError, match=r"latent attention \(kv_lora_rank\) of a kind it does not know \(deepseek_v32"):
        model_shape(job(model={"name_or_path": str(tmp_path / "sparse")}))


@pytest.mark.parametrize("kind, settings", [
    ("glm4_moe", {"first_k_dense_replace": 1, "n_shared_experts": 1}),  # GLM-4.5: a shared expert, no gate
    ("qwen3_moe", {"mlp_only_layers": [1]}),
])
def test_a_mixture_of_experts_with_dense_layers_is_planned_layer_by_layer(tmp_path, kind, settings):
    """GLM-4.5's first dense layers (first_k_dense_replace) beside its expert layers with a
    shared expert, and Qwen3-MoE's mlp_only_layers: the weights as the model has them, the
    adapters as PEFT makes them (which takes the MLP names of the dense layers and the shared
    experts for the experts), and the activations within 20% of what ft-ray's forward keeps
    (measured on CPU, LoRA on every linear layer and on the experts)."""
    from transformers import AutoModelForCausalLM

    from ft_ray.models import apply_lora, load_base_model
    from ft_ray.plan import activation_bytes, adapter_params
    from tests.conftest import tiny_moe

    folder = tiny_moe(tmp_path / kind, kind, num_hidden_layers=3, **settings).name_or_path
    config = job(model={"name_or_path": folder}, lora={"dropout": 0.0, "target_modules": "all-linear"},
                 distributed={"num_workers": 1}, train={"precision": "bf16", "micro_batch_size": 1})
    shape, _ = model_shape(config)
    assert (shape.layers, shape.dense_layers, shape.expert_layers, shape.intermediate) == (3, 1, 2, 128)
    assert shape.shared_intermediate == (32 if kind == "glm4_moe" else 0)
    real = AutoModelForCausalLM.from_pretrained(folder)
    assert shape.params == sum(p.numel() for p in real.parameters())  # q's and k's norms included
    assert shape.all_expert_params == sum(p.numel() for n, p in real.named_parameters() if ".experts." in n or
                                          n.endswith("mlp.gate.weight"))
    for targets in ("all-linear", ["q_proj", "gate_up_proj", "down_proj"], ["gate_proj", "up_proj", "down_proj"]):
        lora = config.lora.model_copy(update={"target_modules": targets})
        adapted = apply_lora(load_base_model(config.model), lora, folder)
        trained = sum(p.numel() for p in adapted.parameters() if p.requires_grad)
        assert adapter_params(config.model_copy(update={"lora": lora}), shape) == trained, targets
    for targets in ("all-linear", ["q_proj", "gate_up_proj", "down_proj"]):
        trained = job(**{**config.model_dump(mode="json"), "lora": {"dropout": 0.0, "target_modules": targets}})
        planned = activation_bytes(trained, shape, 2) / shape.layers
        planned += plan_memory(trained, shape).parts["expert_weight_copies"] * MIB / 256 / shape.layers
        assert saved_for_backward(trained, 256) == pytest.approx(planned, rel=0.2), targets


def test_a_model_that_normalizes_q_and_k_keeps_what_its_norms_keep(tmp_path):
    """Qwen3's attention normalizes q and k (RMSNorm per head): against a Llama of the same
    shape, its layers keep the norms' fp32 inputs (and, in a full fine-tune, where the norms'
    weights train, their outputs): what ft-ray's forward keeps on CPU grows as planned, within
    25%, under LoRA and a full fine-tune."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from ft_ray.config import ModelConfig
    from ft_ray.models import load_tokenizer
    from ft_ray.plan import activation_bytes

    tokenizer = load_tokenizer(ModelConfig())
    kept, planned = {}, {}
    for kind in ("llama", "qwen3"):
        folder = tmp_path / kind
        AutoModelForCausalLM.from_config(AutoConfig.for_model(
            kind, hidden_size=256, intermediate_size=768, head_dim=32, num_hidden_layers=2, num_attention_heads=8,
            num_key_value_heads=4, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id)).save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        for method in ("lora", "full"):
            config = job(model={"name_or_path": str(folder)}, method=method, distributed={"num_workers": 1},
                         lora={"dropout": 0.0, "target_modules": "all-linear"},
                         train={"precision": "fp32" if method == "full" else "bf16", "micro_batch_size": 1})
            shape, _ = model_shape(config)
            assert shape.qk_norm == (kind == "qwen3")
            torch.manual_seed(0)
            kept[kind, method] = saved_for_backward(config, 256)
            planned[kind, method] = activation_bytes(config, shape, 4 if method == "full" else 2) / shape.layers
    for method in ("lora", "full"):
        grown = kept["qwen3", method] - kept["llama", method]
        assert grown > 1000  # (256 + 128) x 4 bytes and more per token and layer
        assert planned["qwen3", method] - planned["llama", method] == pytest.approx(grown, rel=0.25), method


def test_latent_attention_is_planned_from_its_latents(tmp_path):
    """DeepSeek's latent attention (k and v of every head from one latent, q from another):
    DeepSeek-V3's config has the 671B weights and 37B active ones it is known for; a tiny
    DeepSeek-V3 (a dense layer, then expert layers with a shared expert), a DeepSeek-V2-Lite
    (q without its latent) and a GLM-4.7-Flash have the weights the models have, the adapters
    PEFT makes (on the latents' projections by their names), and activations within 20% of
    what ft-ray's forward keeps (measured on CPU, LoRA on every linear layer and on the
    attention alone)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from ft_ray.models import apply_lora, load_base_model
    from ft_ray.plan import activation_bytes, adapter_params
    from tests.conftest import tiny_moe

    v3 = Shape.of(AutoConfig.for_model("deepseek_v3"))  # transformers' defaults: DeepSeek-V3's config
    assert KNOWN_SHAPES["deepseek-ai/DeepSeek-V3"] == v3
    assert (round(v3.params / 1e9), round(v3.active_params / 1e9)) == (671, 38)
    assert (v3.q_rank, v3.kv_rank, v3.head_dim, v3.v_head_dim, v3.dense_layers) == (1536, 512, 192, 128, 3)

    for kind, settings in (("deepseek_v2", {"q_lora_rank": None}), ("glm4_moe_lite", {})):
        folder = tiny_moe(tmp_path / kind, kind, num_hidden_layers=3, n_shared_experts=1, **settings)
        shape, _ = model_shape(job(model={"name_or_path": folder.name_or_path}))
        real = AutoModelForCausalLM.from_pretrained(folder.name_or_path)
        assert type(real).__name__.lower().startswith(kind.replace("_", ""))
        assert (shape.params, shape.q_rank > 0) == (sum(p.numel() for p in real.parameters()), not settings), kind

    folder = tiny_moe(tmp_path / "v3", "deepseek_v3", num_hidden_layers=3, first_k_dense_replace=1,
                      n_shared_experts=1).name_or_path
    config = job(model={"name_or_path": folder}, lora={"dropout": 0.0, "target_modules": "all-linear"},
                 distributed={"num_workers": 1}, train={"precision": "bf16", "micro_batch_size": 1})
    shape, _ = model_shape(config)
    assert (shape.layers, shape.dense_layers, shape.q_rank, shape.kv_rank, shape.head_dim, shape.v_head_dim) == (
        3, 1, 48, 32, 24, 16)
    real = AutoModelForCausalLM.from_pretrained(folder)
    assert shape.params == sum(p.numel() for p in real.parameters())
    attention = ["q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"]
    for targets in ("all-linear", attention, ["q_proj", "k_proj", "v_proj", "o_proj"]):
        lora = config.lora.model_copy(update={"target_modules": targets})
        adapted = apply_lora(load_base_model(config.model), lora, folder)
        trained = sum(p.numel() for p in adapted.parameters() if p.requires_grad)
        assert adapter_params(config.model_copy(update={"lora": lora}), shape) == trained, targets
    for targets in ("all-linear", attention):
        trained = job(**{**config.model_dump(mode="json"), "lora": {"dropout": 0.0, "target_modules": targets}})
        planned = activation_bytes(trained, shape, 2) / shape.layers
        planned += plan_memory(trained, shape).parts.get("expert_weight_copies", 0) * MIB / 256 / shape.layers
        assert saved_for_backward(trained, 256) == pytest.approx(planned, rel=0.2), targets


def test_cpu_memory_while_loading_is_the_whole_model_rank_0_s_or_a_partition(tmp_path, capsys):
    """What each worker holds in CPU memory while it loads (Llama 3 8B, 4 workers): the whole
    model in its load dtype on every worker (fp32 for a full fine-tune, DPO's inline copy
    beside it), on rank 0 alone under fsdp's cpu_ram_efficient_loading (the others' shards on
    the GPU, or in CPU memory with offload), a partition in the compute dtype each under ZeRO-3's
    zero3_init (on the GPU unless the parameters are offloaded); nothing said for QLoRA."""
    from ft_ray.plan import loading_memory

    shape = Shape(4096, 14336, 32, 32, 8, 128, 128256, False)
    gib = shape.params / 2 ** 30

    def loading(**sections):
        plan = loading_memory(job(distributed={"num_workers": 4, "use_gpu": True, **sections.pop("distributed", {})},
                                  train={"precision": "bf16"}, **sections), shape)
        return None if plan is None else (round(plan.rank0_mib / 1024, 2), round(plan.others_mib / 1024, 2))

    assert loading(method="full") == (round(4 * gib, 2),) * 2
    assert loading(method="lora") == (round(2 * gib, 2),) * 2
    assert loading(method="full", objective="dpo", preference={"reference": "inline"}) == (round(8 * gib, 2),) * 2
    assert loading(method="full", distributed={"strategy": "fsdp"}) == (round(4 * gib, 2), 0)
    assert loading(method="full", distributed={"strategy": "fsdp", "fsdp": {"offload": "cpu"}}) == (
        round(4 * gib, 2), round(gib, 2))
    zero3 = {"strategy": "deepspeed", "deepspeed": {"stage": 3}}
    assert loading(method="full", distributed=zero3) == (0, 0)
    assert loading(method="full", distributed={**zero3, "deepspeed": {"stage": 3, "offload_params": "cpu"}}) == (
        round(gib / 2, 2),) * 2  # bf16 partitions of a quarter each
    assert loading(method="full", distributed={**zero3, "deepspeed": {"stage": 3, "zero3_init": False}}) == (
        round(4 * gib, 2),) * 2
    assert loading(method="qlora") is None

    path = tmp_path / "job.yaml"
    path.write_text(json.dumps({"data": {"train": "unused.jsonl"}, "method": "full",
                                "distributed": {"num_workers": 2, "strategy": "fsdp"}}))
    main(["plan", str(path)])
    assert re.search(r"CPU memory while loading: rank 0 [\d.]+ GiB, each other worker [\d.]+ GiB: rank 0 alone reads",
                     capsys.readouterr().out)
    main(["plan", str(path), "--json"])
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["loading_mib"]["how"].startswith("rank 0 alone")
