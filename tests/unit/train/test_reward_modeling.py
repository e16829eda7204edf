"""Objective reward_model: each span's score in a packed row against the model scoring that
prompt + answer alone, the pairwise loss by hand, and steps in one process (no Ray) that
teach a LoRA, a QLoRA and a full reward model the demo's preference."""

from __future__ import annotations

import math

import pytest
import torch

from ft_ray.config import ConfigError, ModelConfig, config_from_dict
from ft_ray.models import load_base_model
from ft_ray.train.attention import register
from ft_ray.train.reward_modeling import RewardModelLoss
from tests.unit.train.test_preference_objectives import packed_demo_pairs

JOB = {"objective": "reward_model", "data": {"train": "t.jsonl"}}


def test_each_answers_score_in_a_packed_row_is_the_models_score_of_that_prompt_and_answer_alone():
    _, batch, tensors = packed_demo_pairs(3)
    torch.manual_seed(0)
    model = load_base_model(ModelConfig(), scores=True).eval()
    model.set_attn_implementation(register())
    objective = RewardModelLoss(model)
    with torch.no_grad():
        chosen, rejected = objective.span_scores(model, tensors)
        starts = [i for i in range(len(batch.ids)) if i == 0 or batch.roles[i] != batch.roles[i - 1]]
        alone = [model(input_ids=torch.as_tensor(batch.ids[s:e], dtype=torch.long)[None]).logits[0, 0].item()
                 for s, e in zip(starts, [*starts[1:], len(batch.ids)])]
    assert torch.stack([chosen, rejected], 1).reshape(-1).tolist() == pytest.approx(alone, abs=1e-4)
    assert len(chosen) == 3 and len(set(alone)) == 6


def test_the_loss_is_minus_log_sigmoid_of_the_score_margin_plus_the_centring_term():
    _, _, tensors = packed_demo_pairs(2)
    torch.manual_seed(0)
    model = load_base_model(ModelConfig(), scores=True).eval()
    model.set_attn_implementation(register())
    with torch.no_grad():
        chosen, rejected = RewardModelLoss(model).span_scores(model, tensors)
        plain, metrics = RewardModelLoss(model).loss(model, tensors)
        centred, _ = RewardModelLoss(model, center_rewards_coefficient=0.01).loss(model, tensors)
    margins = (chosen - rejected).tolist()
    assert plain.item() == pytest.approx(sum(math.log1p(math.exp(-m)) for m in margins) / 2, rel=1e-5)
    assert centred.item() == pytest.approx(plain.item() + 0.01 * ((chosen + rejected) ** 2).mean().item(), rel=1e-5)
    assert metrics["reward_accuracy"] == sum(m > 0 for m in margins)
    assert metrics["reward_margin"] == pytest.approx(sum(margins), rel=1e-5)


@pytest.mark.parametrize("method", ["lora", "qlora", "full"])
def test_a_few_steps_teach_the_preference_and_the_checkpoint_reloads(method, tmp_path):
    """The demo's pairs (house style chosen, a generic voice rejected): a few steps and every
    chosen answer scores above its rejected one; the saved weights (with LoRA, the score head
    saved beside the adapter) load into a new model with the same scores."""
    from ft_ray.train.engines import DDPEngine
    from ft_ray.train.modeling import build_model
    from ft_ray.train.objectives import build_objective

    def engine_of(config):
        torch.manual_seed(1)
        model = build_model(config, "builtin:tiny-llama")
        return DDPEngine(model, config, total_steps=12, objective=build_objective(config, model))

    config = config_from_dict({**JOB, "method": method, "lora": {"dropout": 0.0},
                               "quantization": {"compute_dtype": "float32"},
                               "train": {"learning_rate": 5e-4 if method == "full" else 5e-3, "warmup_steps": 0}})
    _, _, tensors = packed_demo_pairs(4)
    engine = engine_of(config)
    before = engine.eval_loss_sum(tensors)
    for _ in range(12):
        engine.micro_step(tensors, 1.0, True)
        engine.step()
    after = engine.eval_loss_sum(tensors)
    assert after[0] < before[0] and after[2]["reward_accuracy"] == 4 and after[1] == 4  # 4 pairs, all ordered
    engine.save(tmp_path, rank=0)
    again = engine_of(config)
    again.load(tmp_path)
    assert again.eval_loss_sum(tensors)[2] == pytest.approx(after[2], rel=1e-4)


def test_a_reward_model_is_refused_what_it_cannot_do():
    with pytest.raises(ConfigError, match="objective reward_model trains on format preference"):
        config_from_dict({**JOB, "data": {"train": "t.jsonl", "format": "instruction"}})
    with pytest.raises(ConfigError, match="train.compare_generations: a reward model generates no answers"):
        config_from_dict({**JOB, "train": {"compare_generations": 2}})
    with pytest.raises(ConfigError, match="preference.center_rewards_coefficient: for objective reward_model, not dpo"):
        config_from_dict({"objective": "dpo", "data": {"train": "t.jsonl"},
                          "preference": {"center_rewards_coefficient": 0.01}})
    assert config_from_dict(JOB).carries_roles
