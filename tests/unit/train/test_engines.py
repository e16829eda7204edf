"""The DDP engine in one process (no Ray): LoRA+'s learning rate for the B matrices, gradient
accumulation, weight decay, 8-bit AdamW."""

from __future__ import annotations

import pytest
import torch

from ft_ray.config import ConfigError, config_from_dict
from ft_ray.train.engines import DDPEngine
from ft_ray.train.modeling import build_model
from ft_ray.train.objectives import build_objective


def one_step_moves(ratio: float) -> tuple[float, float, list[float]]:
    """The largest change of any LoRA A and B entry in one AdamW step from PEFT's start, and
    the optimizer's group rates."""
    config = config_from_dict({"data": {"train": "t.jsonl"}, "lora": {"loraplus_lr_ratio": ratio, "dropout": 0.0},
                               "train": {"learning_rate": 1e-3, "warmup_steps": 0, "weight_decay": 0.0}})
    model = build_model(config, "builtin:tiny-llama")
    engine = DDPEngine(model, config, total_steps=10, objective=build_objective(config, model))
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    rates = [group["lr"] for group in engine.optimizer.param_groups]  # those of the first step
    torch.manual_seed(0)
    ids = torch.randint(3, 700, (2, 32))
    engine.micro_step({"input_ids": ids, "labels": ids, "position_ids": torch.arange(32).repeat(2, 1)}, 1.0, True)
    engine.step()
    moved = {n: (p.detach() - before[n]).abs().max().item() for n, p in model.named_parameters() if p.requires_grad}
    return (max(v for n, v in moved.items() if "lora_A" in n), max(v for n, v in moved.items() if "lora_B" in n),
            rates)


def test_loraplus_moves_the_b_matrices_at_ratio_times_the_rate():
    # PEFT starts B at zero, so A has no gradient at the first step, and Adam's first step
    # moves every entry with a gradient by its group's rate
    a, b, rates = one_step_moves(1.0)
    assert (a, rates) == (0.0, [1e-3]) and b == pytest.approx(1e-3, rel=1e-3)
    a, b, rates = one_step_moves(16.0)
    assert a == 0.0 and rates == pytest.approx([1e-3, 16e-3]) and b == pytest.approx(16e-3, rel=1e-3)
    with pytest.raises(ConfigError, match="lora.loraplus_lr_ratio: LoRA\\+ sets the learning rate of LoRA's B "
                                          "matrices; method full trains none"):
        config_from_dict({"method": "full", "data": {"train": "t.jsonl"}, "lora": {"loraplus_lr_ratio": 16}})


def test_accumulated_micro_batches_weigh_every_target_token_as_one_batch_would():
    """Gradient accumulation: each micro batch's mean loss is scaled by its share of the step's
    target tokens (`loop.step_scales`), so 2 micro batches of 2 rows give the gradient of one
    batch of the 4 rows, also when one micro batch has far fewer targets than the other; the
    mean of the two micro batches' means (ft-ray before, HF's trainer before its 2024 fix)
    gives another."""
    from ft_ray.data.tokenize import IGNORE_INDEX
    from ft_ray.train.loop import step_scales

    config = config_from_dict({"method": "full", "data": {"train": "t.jsonl"}, "train": {"precision": "fp32"}})
    model = build_model(config, "builtin:tiny-llama")
    objective = build_objective(config, model)
    engine = DDPEngine(model, config, total_steps=10, objective=objective)
    torch.manual_seed(0)
    ids = torch.randint(3, 700, (4, 32))
    labels = ids.clone()
    labels[:2, :28] = IGNORE_INDEX  # the first micro batch: 2 x 4 targets; the second: 2 x 31
    rows = {"input_ids": ids, "labels": labels, "position_ids": torch.arange(32).repeat(4, 1)}
    halves = [{key: value[part] for key, value in rows.items()} for part in (slice(0, 2), slice(2, 4))]

    def gradient(micro_batches, scales):
        model.zero_grad(set_to_none=True)
        for batch, scale in zip(micro_batches, scales):
            engine.micro_step(batch, scale, True)
        return torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad])

    whole = gradient([rows], [1.0])
    scales = step_scales(engine.step_weights(halves))
    assert scales == pytest.approx([8 / 70, 62 / 70])  # each micro batch's targets (the first token has no label)

    def off(g: torch.Tensor) -> float:
        return ((g - whole).norm() / whole.norm()).item()

    assert off(gradient(halves, scales)) < 1e-5
    assert off(gradient(halves, [0.5, 0.5])) > 0.5  # 0.92


def test_weight_decay_leaves_norms_and_biases_alone():
    """`train.weight_decay` shrinks matrices only (Hugging Face's trainer's rule): an AdamW step
    without gradients moves a decayed matrix by lr x decay of itself and no norm weight."""
    config = config_from_dict({"method": "full", "data": {"train": "t.jsonl"}, "train": {
        "precision": "fp32", "learning_rate": 1e-2, "weight_decay": 0.1, "warmup_steps": 0}})
    model = build_model(config, "builtin:tiny-llama")
    engine = DDPEngine(model, config, total_steps=10, objective=build_objective(config, model))
    assert [(group["lr"], group["weight_decay"]) for group in engine.optimizer.param_groups] == [(1e-2, 0.1),
                                                                                                (1e-2, 0.0)]
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    engine.optimizer.step()
    after = dict(model.named_parameters())
    norm, matrix = "model.layers.0.input_layernorm.weight", "model.layers.0.self_attn.q_proj.weight"
    torch.testing.assert_close(after[norm].detach(), before[norm])
    torch.testing.assert_close(after[matrix].detach(), before[matrix] * (1 - 1e-2 * 0.1))


def test_8bit_adamw_trains_in_a_quarter_of_the_states_plan_counts_and_resumes_exactly(tmp_path):
    """train.optimizer adamw_8bit (bitsandbytes' 8-bit AdamW, on CPU here): a full fine-tune's
    states are uint8 for every matrix, a quarter of fp32 AdamW's bytes, as `ft-ray plan` counts
    them; its steps lower the loss as AdamW's do; saved and loaded into a new engine, the next
    step is the one the engine that went on took. Refused with DeepSpeed's optimizer offload
    (under ZeRO: `test_fsdp_engine.py`)."""
    from ft_ray.plan import Shape, plan_memory

    torch.manual_seed(0)
    ids = torch.randint(3, 700, (4, 64))
    batch = {"input_ids": ids, "labels": ids, "position_ids": torch.arange(64).repeat(4, 1)}

    def engine_of(optimizer: str) -> tuple[DDPEngine, float]:
        """The engine and the optimizer states `ft-ray plan` counts for it (MiB)."""
        config = config_from_dict({"method": "full", "data": {"train": "t.jsonl"}, "train": {
            "precision": "fp32", "learning_rate": 1e-3, "warmup_steps": 0, "optimizer": optimizer}})
        model = build_model(config, "builtin:tiny-llama")
        planned = plan_memory(config, Shape.of(model.config)).parts["optimizer_states"]
        return DDPEngine(model, config, total_steps=10, objective=build_objective(config, model)), planned

    def steps(engine: DDPEngine, count: int) -> list[float]:
        losses = []
        for _ in range(count):
            losses.append(engine.micro_step(batch, 1.0, True)[0])
            engine.step()
        return losses

    def state_mib(engine: DDPEngine) -> float:
        return sum(t.numel() * t.element_size() for state in engine.optimizer.state.values()
                   for t in state.values() if torch.is_tensor(t)) / 2**20

    (full, full_planned), (eight, eight_planned) = engine_of("adamw"), engine_of("adamw_8bit")
    assert type(eight.optimizer).__name__ == "AdamW8bit"
    adamw, eight_bit = steps(full, 4), steps(eight, 4)
    assert eight_bit[-1] < 0.8 * eight_bit[0] and eight_bit[-1] == pytest.approx(adamw[-1], rel=0.05)
    q_proj = eight.module.model.layers[0].self_attn.q_proj.weight
    assert eight.optimizer.state[q_proj]["state1"].dtype == torch.uint8
    assert state_mib(full) == pytest.approx(full_planned, rel=0.01)
    assert state_mib(eight) == pytest.approx(eight_planned, rel=0.1) and state_mib(eight) < 0.3 * state_mib(full)

    eight.save(tmp_path / "checkpoint", rank=0)
    resumed, _ = engine_of("adamw_8bit")
    resumed.load(tmp_path / "checkpoint")
    steps(eight, 1), steps(resumed, 1)
    for (name, went_on), back in zip(eight.module.named_parameters(), resumed.module.parameters()):
        torch.testing.assert_close(back, went_on, rtol=0, atol=0, msg=name)
    with pytest.raises(ConfigError, match="train.optimizer: adamw_8bit keeps its states on the GPU in 8 bits; "
                                          "distributed.deepspeed.offload_optimizer moves fp32 states to the CPU"):
        config_from_dict({"data": {"train": "t.jsonl"}, "train": {"optimizer": "adamw_8bit"}, "distributed": {
            "strategy": "deepspeed", "deepspeed": {"stage": 2, "offload_optimizer": "cpu"}}})
