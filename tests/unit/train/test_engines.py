"""The DDP engine in one process (no Ray): LoRA+'s learning rate for the B matrices."""

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
