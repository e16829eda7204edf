"""What a run learns from a batch: the objective. Engines call it and never compute a loss
themselves: next-token loss (SFT) here, a teacher's distributions in `ft_ray.train.distillation`,
the preference objectives (DPO, ORPO, SimPO, KTO) in `ft_ray.train.preference`, GRPO in
`ft_ray.train.grpo`, a reward model's pairwise loss in `ft_ray.train.reward_modeling`.

An objective says which batch columns it reads, turns the model's outputs into the loss to
back-propagate (and the metrics to log beside it, as sums over what the loss is averaged
over), and counts what a batch's mean loss is averaged over, so evaluation and the logged
windows can weigh batches of different sizes.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch

from ft_ray.console import LOG
from ft_ray.data.tokenize import IGNORE_INDEX


class Objective(Protocol):
    name: str
    columns: tuple[str, ...]  # the batch columns `loss` reads
    metrics: tuple[str, ...]  # the names of the metrics `loss` returns, in a fixed order
    # optional `training_only`: those of `metrics` an evaluation leaves out of its `eval_` lines
    # optional `step_weights(model, micro_batches)`: what each micro batch of a training step
    # averages its loss over where only a forward knows it (GRPO's sampled answer tokens); else `weight`

    def loss(self, model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        """(the batch's mean loss, to back-propagate; each metric summed over the batch's `weight`)."""

    def weight(self, batch: dict[str, torch.Tensor]) -> int:
        """What the mean loss of `batch` is averaged over (target tokens, pairs...)."""


class NextTokenLoss:
    """Supervised fine-tuning: mean cross-entropy of the next token over the target tokens.
    Attention stays inside packed examples (no attention mask, position ids restarting per
    example: see `ft_ray.data.tokenize`). With `router_aux_loss` (a mixture of experts whose
    routers train: `trains_routers`), training adds the model's own load-balancing loss at
    its `router_aux_loss_coef`, as its pre-training did, so routing does not collapse onto a
    few experts; evaluation stays the cross-entropy alone."""

    name = "sft"
    columns = ("input_ids", "labels", "position_ids")
    metrics = ()

    def __init__(self, router_aux_loss: bool = False):
        self.router_aux_loss = router_aux_loss

    def loss(self, model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        balance = {"output_router_logits": True} if self.router_aux_loss and model.training else {}
        outputs = model(input_ids=batch["input_ids"], labels=batch["labels"], position_ids=batch["position_ids"],
                        use_cache=False, **balance)
        return outputs.loss, {}

    def weight(self, batch: dict[str, torch.Tensor]) -> int:
        return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def build_objective(config: Any, model: Any = None) -> Objective:
    """The job's objective; a preference objective gets its reference model (the trained
    `model` with its adapter switched off, or a frozen copy of the base for a full fine-tune),
    distillation its teacher."""
    if config.objective == "sft":
        balanced = model is not None and trains_routers(model)
        if balanced:
            LOG.info(f"note: the routers of this mixture of experts train: the training loss adds its load-balancing "
                     f"loss (router_aux_loss_coef {model.config.router_aux_loss_coef})")
        return NextTokenLoss(router_aux_loss=balanced)
    if config.objective == "distill":
        from ft_ray.train.distillation import build_distill_objective

        return build_distill_objective(config, model)
    if config.objective == "grpo":
        from ft_ray.train.grpo import build_grpo_objective

        return build_grpo_objective(config, model)
    if config.objective == "reward_model":
        from ft_ray.train.reward_modeling import RewardModelLoss

        return RewardModelLoss(model, config.preference.center_rewards_coefficient)
    from ft_ray.train.preference import build_preference_objective

    return build_preference_objective(config, model)


def with_precomputed(config: Any, datasets: dict[str, Any]) -> dict[str, Any]:
    """The packed datasets with the columns a frozen model computes before training
    (`JobConfig.precomputes`: the reference's log-probs, the teacher's top-k logits), where
    they lack them (prepared data holds them)."""
    from ft_ray.train.distillation import TEACHER_LOGITS, with_teacher
    from ft_ray.train.preference import REF_COLUMN, with_reference

    columns = datasets["train"].columns()
    if config.precomputes_reference and REF_COLUMN not in columns:
        return with_reference(config, datasets)
    if config.precomputes_teacher and TEACHER_LOGITS not in columns:
        return with_teacher(config, datasets)
    return datasets


def trains_routers(model: Any) -> bool:
    """Whether a mixture of experts with a load-balancing loss (`router_aux_loss_coef`) trains
    its routers' weights: a full fine-tune, or LoRA on them (all-linear)."""
    config = getattr(model, "config", None)
    if not getattr(config, "router_aux_loss_coef", 0):
        return False
    routers = [name.removesuffix(".base_layer") + "." for name, module in model.named_modules()
               if type(module).__name__.endswith("Router")]
    return any(weight.requires_grad and name.startswith(tuple(routers)) for name, weight in model.named_parameters())
