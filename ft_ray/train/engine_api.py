"""The engine interface the training loop calls, and what both engines share.

An engine owns one worker's model, optimizer and schedule: `micro_step` (forward and
backward of one micro batch, gradients synchronised only when told; returns the loss and
the objective's metric sums), `step` (the update;
gradient accumulation is decided by the loop, which calls it every `gradient_accumulation`
micro steps), `lr`, `eval_loss_sum`, `save` and `load` (the weights in the HF/PEFT layout
under `model/`, so export does not care which engine trained them). The loss always comes
from the run's `Objective`. Implemented by `engines.DDPEngine` and
`deepspeed_engine.DeepSpeedEngine`.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable, Protocol

import torch

from ft_ray.train.objectives import Objective

COMPUTE_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}  # train.precision -> autocast dtype


class Engine(Protocol):
    module: Any  # the model as built (unwrapped), what `save_pretrained` is called on
    device: torch.device
    saves_on_every_rank: bool  # True: every rank writes its own shard of a checkpoint

    def micro_step(self, batch: dict[str, torch.Tensor], scale: float, sync: bool) -> tuple[float, dict[str, float]]: ...

    def step(self) -> float: ...

    @property
    def lr(self) -> float: ...

    def eval_loss_sum(self, batch: dict[str, torch.Tensor]) -> tuple[float, int, dict[str, float]]: ...

    def save(self, folder: Path, rank: int) -> None: ...

    def load(self, folder: Path) -> None: ...


def warmup_cosine(warmup_steps: int, total_steps: int, min_ratio: float = 0.1) -> Callable[[int], float]:
    """Learning-rate multiplier: linear warmup, then cosine decay to `min_ratio`."""

    def multiplier(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return multiplier


@torch.no_grad()
def eval_loss_sum(model: Any, forward_loss: Callable, objective: Objective,
                  batch: dict[str, torch.Tensor]) -> tuple[float, int, dict[str, float]]:
    """(the batch's loss summed over what it is averaged over, that count, the objective's
    metric sums) of one batch."""
    model.eval()
    loss, metrics = forward_loss(batch)
    model.train()
    weight = objective.weight(batch)
    return loss.item() * weight, weight, metrics
