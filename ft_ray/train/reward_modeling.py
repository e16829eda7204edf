"""Objective reward_model: a sequence classifier with one score, trained on preference pairs
to score the chosen answer above the rejected one (Bradley-Terry, as TRL's RewardTrainer):
-log sigmoid(s_chosen - s_rejected) per pair, plus `preference.center_rewards_coefficient`
times (s_chosen + s_rejected)^2 (keeps the scores near 0).

The data is packed as DPO's (`preference.py`): each answer a span of its own (prompt + answer,
positions restarting at 0), every token's role in `roles`. The model's own forward pools one
score per row (at the row's last token); a packed row holds several spans, so the score head's
output at every position is taken from the head itself (a forward hook) and each span's score
is the one at its last answer token, where the prompt and the whole answer are seen, as a
reward model scores a prompt + answer text.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from ft_ray.data.formats import CHOSEN, REJECTED
from ft_ray.data.tokenize import IGNORE_INDEX
from ft_ray.models import causal_lm
from ft_ray.train.preference import answer_sums, count_role, unwrapped

METRICS = ("rewards_chosen", "rewards_rejected", "reward_accuracy", "reward_margin")


def score_head(model: Any) -> Any:
    """The score head (`score`, transformers' sequence classifiers') of a model, under PEFT's
    wrapper where there is one.

    Raises:
        ValueError: the model has no such head.
    """
    inner = causal_lm(unwrapped(model))
    head = getattr(inner, "score", None)
    if not isinstance(head, torch.nn.Module):
        raise ValueError(f"objective reward_model: {type(inner).__name__} has no `score` head (transformers' "
                         "sequence classifiers of Llama, Mistral, Qwen, Gemma... have one)")
    return head


def last_answer_tokens(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """[B, L] bool: the last target token of each span (the next token is no target, starts
    another span, or the row ends)."""
    target = batch["labels"] != IGNORE_INDEX
    following = torch.zeros_like(target)
    following[:, :-1] = target[:, 1:] & (batch["position_ids"][:, 1:] != 0)
    return target & ~following


class RewardModelLoss:
    """Objective reward_model (see the module's docstring)."""

    name = "reward_model"
    columns = ("input_ids", "labels", "position_ids", "roles")
    metrics = METRICS

    def __init__(self, model: Any, center_rewards_coefficient: float = 0.0):
        self.center = center_rewards_coefficient
        self.outputs: list[torch.Tensor] = []
        self.head = score_head(model)
        self.hooked = False

    def hook(self) -> None:
        """Keep the head's outputs, from the first forward on: after DeepSpeed's hooks (the
        engine is made after the objective), so under ZeRO-3 the kept output is the one its
        backward bookkeeping wraps, not the bare tensor whose backward it would not see."""
        if not self.hooked:
            self.head.register_forward_hook(lambda _module, _args, output: self.outputs.append(output))
            self.hooked = True

    def weight(self, batch: dict[str, torch.Tensor]) -> int:
        return count_role(batch, CHOSEN)  # pairs

    def span_scores(self, model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(chosen, rejected) scores of the batch's pairs, in order."""
        self.hook()
        self.outputs.clear()
        model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False)
        scores = self.outputs[0][..., 0]  # [B, L]: the head at every position (the first call: not a recompute)
        answers = answer_sums(scores * last_answer_tokens(batch), batch)
        return answers.of(CHOSEN)[0], answers.of(REJECTED)[0]

    def loss(self, model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        chosen, rejected = self.span_scores(model, batch)
        loss = -F.logsigmoid(chosen - rejected).mean()
        if self.center:
            loss = loss + self.center * ((chosen + rejected) ** 2).mean()
        c, r = chosen.detach(), rejected.detach()
        return loss, {"rewards_chosen": c.sum().item(), "rewards_rejected": r.sum().item(),
                      "reward_accuracy": (c > r).float().sum().item(), "reward_margin": (c - r).sum().item()}
