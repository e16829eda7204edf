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
