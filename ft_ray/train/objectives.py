"""What a run learns from a batch: the objective. Engines call it and never compute a loss
themselves: next-token loss (SFT) here, the preference objectives (DPO, ORPO, SimPO, KTO) in
`ft_ray.train.preference`, GRPO in `ft_ray.train.grpo`, a reward model's pairwise loss in
`ft_ray.train.reward_modeling`.

An objective says which batch columns it reads, turns the model's outputs into the loss to
back-propagate (and the metrics to log beside it, as sums over what the loss is averaged
over), and counts what a batch's mean loss is averaged over, so evaluation and the logged
windows can weigh batches of different sizes.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch

from ft_ray.data.tokenize import IGNORE_INDEX


class Objective(Protocol):
    name: str
    columns: tuple[str, ...]  # the batch columns `loss` reads
    metrics: tuple[str, ...]  # the names of the metrics `loss` returns, in a fixed order
    # optional `training_only`: those of `metrics` an evaluation leaves out of its `eval_` lines

    def loss(self, model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        """(the batch's mean loss, to back-propagate; each metric summed over the batch's `weight`)."""

    def weight(self, batch: dict[str, torch.Tensor]) -> int:
        """What the mean loss of `batch` is averaged over (target tokens, pairs...)."""


class NextTokenLoss:
    """Supervised fine-tuning: mean cross-entropy of the next token over the target tokens.
    Attention stays inside packed examples (no attention mask, position ids restarting per
    example: see `ft_ray.data.tokenize`)."""

    name = "sft"
    columns = ("input_ids", "labels", "position_ids")
    metrics = ()

    def loss(self, model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        outputs = model(input_ids=batch["input_ids"], labels=batch["labels"], position_ids=batch["position_ids"],
                        use_cache=False)
        return outputs.loss, {}

    def weight(self, batch: dict[str, torch.Tensor]) -> int:
        return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def build_objective(config: Any, model: Any = None) -> Objective:
    """The job's objective; a preference objective gets its reference model (the trained
    `model` with its adapter switched off, or a frozen copy of the base for a full fine-tune)."""
    if config.objective == "sft":
        return NextTokenLoss()
    if config.objective == "grpo":
        from ft_ray.train.grpo import build_grpo_objective

        return build_grpo_objective(config, model)
    if config.objective == "reward_model":
        from ft_ray.train.reward_modeling import RewardModelLoss

        return RewardModelLoss(model, config.preference.center_rewards_coefficient)
    from ft_ray.train.preference import build_preference_objective

    return build_preference_objective(config, model)
