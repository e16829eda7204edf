"""What a run learns from a batch: the objective. Engines call it and never compute a loss
themselves, so a new objective (DPO, ORPO, KTO) is one class here plus its data columns.

An objective says which batch columns it reads, turns the model's outputs into the loss to
back-propagate (and the metrics to log beside it), and counts what a batch's mean loss is
averaged over, so evaluation can weigh batches of different sizes.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch

from ft_ray.data.tokenize import IGNORE_INDEX


class Objective(Protocol):
    name: str
    columns: tuple[str, ...]  # the batch columns `loss` reads

    def loss(self, model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        """(the batch's mean loss, to back-propagate; metrics of the batch, as plain numbers)."""

    def weight(self, batch: dict[str, torch.Tensor]) -> int:
        """What the mean loss of `batch` is averaged over (target tokens, pairs...)."""


class NextTokenLoss:
    """Supervised fine-tuning: mean cross-entropy of the next token over the target tokens.
    Attention stays inside packed examples (no attention mask, position ids restarting per
    example: see `ft_ray.data.tokenize`)."""

    name = "sft"
    columns = ("input_ids", "labels", "position_ids")

    def loss(self, model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        outputs = model(input_ids=batch["input_ids"], labels=batch["labels"], position_ids=batch["position_ids"],
                        use_cache=False)
        return outputs.loss, {}

    def weight(self, batch: dict[str, torch.Tensor]) -> int:
        return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def build_objective(config: Any) -> Objective:
    """The job's objective (next-token loss: the only one so far)."""
    return NextTokenLoss()
