"""The objective seam: the next-token loss the engines call, against a hand computation."""

import torch

from ft_ray.config import ModelConfig
from ft_ray.models import load_base_model
from ft_ray.train.objectives import IGNORE_INDEX, NextTokenLoss


def test_next_token_loss_is_the_mean_cross_entropy_over_target_tokens():
    model = load_base_model(ModelConfig()).eval()
    ids = torch.tensor([[5, 9, 14, 20, 7, 3]])
    labels = torch.tensor([[IGNORE_INDEX, IGNORE_INDEX, 14, 20, IGNORE_INDEX, 3]])
    batch = {"input_ids": ids, "labels": labels, "position_ids": torch.arange(6)[None]}
    objective = NextTokenLoss()
    with torch.no_grad():
        loss, metrics = objective.loss(model, batch)
        logits = model(input_ids=ids, position_ids=batch["position_ids"]).logits[0]
    # token t is predicted from position t - 1; only labelled tokens count
    by_hand = torch.stack([torch.nn.functional.cross_entropy(logits[t - 1], ids[0, t]) for t in (2, 3, 5)]).mean()
    torch.testing.assert_close(loss, by_hand, rtol=1e-5, atol=1e-5)
    assert metrics == {} and objective.weight(batch) == 3
    assert set(objective.columns) <= set(batch)


def test_a_mixture_of_experts_whose_routers_train_adds_its_load_balancing_loss(tmp_path):
    """A full fine-tune of a mixture of experts (a tiny Mixtral) trains its routers: training's
    loss adds the model's load-balancing loss at its router_aux_loss_coef, as the model's own
    forward with output_router_logits does (through ft-ray's chunked output layer here), and
    evaluation's is the cross-entropy alone. LoRA on attention leaves the routers as they are:
    no such loss; LoRA on all-linear adapts them: the loss again."""
    from transformers import AutoModelForCausalLM

    from ft_ray.config import config_from_dict
    from ft_ray.train.modeling import build_model
    from ft_ray.train.objectives import build_objective
    from tests.conftest import tiny_moe

    folder = tiny_moe(tmp_path / "mixtral", "mixtral").name_or_path

    def job(method: str, targets="all-linear"):
        return config_from_dict({"method": method, "model": {"name_or_path": folder, "max_seq_len": 64},
                                 "data": {"train": "t.jsonl"}, "lora": {"dropout": 0.0, "target_modules": targets},
                                 "train": {"precision": "fp32"}})

    model = build_model(job("full"), folder)
    objective = build_objective(job("full"), model)
    assert objective.router_aux_loss and model.forward.chunked_head
    torch.manual_seed(0)
    ids = torch.randint(3, 700, (2, 24))
    batch = {"input_ids": ids, "labels": ids, "position_ids": torch.arange(24).repeat(2, 1)}
    own = AutoModelForCausalLM.from_pretrained(folder)
    with torch.no_grad():
        balanced = own(input_ids=ids, labels=ids, position_ids=batch["position_ids"], output_router_logits=True)
        plain = own(input_ids=ids, labels=ids, position_ids=batch["position_ids"]).loss
        assert balanced.aux_loss > 0 and balanced.loss > plain
        torch.testing.assert_close(objective.loss(model.train(), batch)[0], balanced.loss, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(objective.loss(model.eval(), batch)[0], plain, rtol=1e-5, atol=1e-5)
    assert not build_objective(job("lora", ["q_proj", "v_proj"]), build_model(job("lora", ["q_proj", "v_proj"]), folder)
                               ).router_aux_loss
    assert build_objective(job("lora"), build_model(job("lora"), folder)).router_aux_loss
