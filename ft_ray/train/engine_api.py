"""The engine interface the training loop calls, and what the engines share.

An engine owns one worker's model, optimizer and schedule: `step_weights` (what each micro
batch of a step averages its loss over, `micro_batch_weights`), `micro_step` (forward and
backward of one micro batch, its mean loss scaled by the loop's `scale`, `loop.step_scales`;
gradients synchronised only when told; returns the loss and the objective's metric sums),
`step` (the update;
gradient accumulation is decided by the loop, which calls it every `gradient_accumulation`
micro steps), `lr`, `eval_loss_sum`, `save` and `load` (the weights in the HF/PEFT layout
under `model/`, so export does not care which engine trained them). The loss always comes
from the run's `Objective`. Implemented by `engines.DDPEngine`, `fsdp_engine.FSDPEngine`
(both on `TorchEngine`) and `deepspeed_engine.DeepSpeedEngine`.
"""

from __future__ import annotations

import contextlib
import math
import sys
from pathlib import Path
from typing import Any, Callable, ContextManager, Protocol

import torch

from ft_ray.config import JobConfig, TrainConfig
from ft_ray.train.objectives import Objective

COMPUTE_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}  # train.precision -> autocast dtype


class Engine(Protocol):
    module: Any  # the model as built (unwrapped), what `save_pretrained` is called on
    device: torch.device
    saves_on_every_rank: bool  # True: every rank writes its own shard of a checkpoint

    def step_weights(self, micro_batches: list[dict[str, torch.Tensor]]) -> list[float]: ...

    def micro_step(self, batch: dict[str, torch.Tensor], scale: float, sync: bool) -> tuple[float, dict[str, float]]: ...

    def step(self) -> float: ...

    @property
    def lr(self) -> float: ...

    def eval_loss_sum(self, batch: dict[str, torch.Tensor]) -> tuple[float, int, dict[str, float]]: ...

    def save(self, folder: Path, rank: int) -> None: ...

    def load(self, folder: Path) -> None: ...


def worker_device(use_gpu: bool) -> torch.device:
    """This worker's device: Ray Train's, or outside a Ray worker the GPU when asked for. (A
    model may still be on the CPU when the objective is built: DDP moves it in the engine.)"""
    if "ray" in sys.modules:
        import ray.train.torch

        with contextlib.suppress(RuntimeError):  # outside a Ray Train worker
            return ray.train.torch.get_device()
    return torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")


class TorchEngine:
    """What the DDP and FSDP engines share: torch's optimizer and schedule over the model
    `self.model` wraps, autocast to `train.precision`, gradients clipped by their norm over
    all workers. A subclass builds `self.model` (the wrapped model) and calls `setup`."""

    module: Any
    model: Any
    device: torch.device

    def setup(self, config: JobConfig, total_steps: int, objective: Objective) -> None:
        """The optimizer (over `self.module`'s parameters: FSDP's shards, once sharded),
        schedule and autocast of a job."""
        train = config.train
        self.objective = objective
        self.optimizer = build_optimizer(self.module, config)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_multiplier(train, total_steps))
        self.max_grad_norm = train.max_grad_norm
        self.autocast_dtype = COMPUTE_DTYPES.get(train.precision)

    def autocast(self) -> Any:
        return (torch.autocast(self.device.type, dtype=self.autocast_dtype) if self.autocast_dtype
                else contextlib.nullcontext())

    def forward_loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        with self.autocast():
            return self.objective.loss(self.model, batch)

    def step_weights(self, micro_batches: list[dict[str, torch.Tensor]]) -> list[float]:
        with self.autocast():
            return micro_batch_weights(self.objective, self.model, micro_batches)

    def micro_step(self, batch: dict[str, torch.Tensor], scale: float, sync: bool) -> tuple[float, dict[str, float]]:
        """Forward and backward of one micro batch; under DDP gradients are all-reduced only if
        `sync` (FSDP reduce-scatters them into each rank's shard at once: holding whole
        gradients between micro steps would cost a whole model's per worker)."""
        no_sync = getattr(self.model, "no_sync", None)
        context = no_sync() if (no_sync and not sync) else contextlib.nullcontext()
        with context:
            loss, metrics = self.forward_loss(batch)
            (loss * scale).backward()
        return loss.item(), metrics

    def step(self) -> float:
        """Clip, update and advance the schedule; returns the gradient norm before clipping
        (over every rank's shards under FSDP)."""
        params = [p for p in self.module.parameters() if p.requires_grad]
        norm = torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)

    @property
    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def eval_loss_sum(self, batch: dict[str, torch.Tensor]) -> tuple[float, int, dict[str, float]]:
        return eval_loss_sum(self.model, self.forward_loss, self.objective, batch)


LORA_B = ("lora_B.", "lora_embedding_B.")  # in the names of LoRA's B matrices (PEFT)


def build_optimizer(model: Any, config: JobConfig) -> torch.optim.Optimizer:
    """`train.optimizer` over `optimizer_groups`: torch's AdamW (fused where it can be), or
    bitsandbytes' 8-bit AdamW (its states quantized in blocks of 256 values; tensors under
    4096 values keep fp32 states), with the same betas, eps and per-group decay."""
    train = config.train
    groups = optimizer_groups(model, config)
    if train.optimizer == "adamw_8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(groups, lr=train.learning_rate, weight_decay=train.weight_decay)
    return torch.optim.AdamW(groups, lr=train.learning_rate, weight_decay=train.weight_decay,
                             fused=train.fused_optimizer or None)


def optimizer_groups(model: Any, config: JobConfig) -> list[dict[str, Any]]:
    """The trainable parameters as optimizer parameter groups: at train.learning_rate, with
    LoRA+ (`lora.loraplus_lr_ratio` other than 1) the B matrices at that many times the rate;
    `train.weight_decay` on matrices only: norms' weights, biases and DoRA's magnitudes (one
    dimension) take none, as in Hugging Face's trainer (decay pulls a norm's weight, which
    starts near 1, towards 0). The schedule scales every group alike; the first group's rate is
    the one logged as `lr`."""
    from ft_ray.models import whole_shape

    ratio, lr, decay = config.lora.loraplus_lr_ratio, config.train.learning_rate, config.train.weight_decay
    loraplus = ratio != 1 and config.trains_adapter
    groups: dict[tuple[float, float], list] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            rate = lr * ratio if loraplus and any(part in name for part in LORA_B) else lr
            # a matrix ZeRO-3 built partitioned holds a flat part of itself: its whole shape says what it is
            groups.setdefault((rate, decay if len(whole_shape(p)) >= 2 else 0.0), []).append(p)
    order = sorted(groups, key=lambda key: (key[0] != lr, key[1] == 0))  # the rate itself first
    return [{"params": groups[key], "lr": key[0], "weight_decay": key[1]} for key in order]


def lr_multiplier(train: TrainConfig, total_steps: int) -> Callable[[int], float]:
    """Learning-rate multiplier of each step: linear warmup over `train.warmup_steps` (at most
    half the run), then `train.lr_schedule` down to `train.min_lr_ratio` at the last step
    (cosine, linear) or flat (constant)."""
    warmup, floor = min(train.warmup_steps, total_steps // 2), train.min_lr_ratio
    decay = {"cosine": lambda done: 0.5 * (1 + math.cos(math.pi * done)), "linear": lambda done: 1 - done,
             "constant": lambda done: 1.0}[train.lr_schedule]

    def multiplier(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        done = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return floor + (1 - floor) * decay(done)

    return multiplier


def micro_batch_weights(objective: Objective, model: Any, micro_batches: list[dict[str, torch.Tensor]]) -> list[float]:
    """What each micro batch of a training step averages its mean loss over: the objective's
    `step_weights(model, micro_batches)` where it knows that only after a forward (GRPO: the
    answers it samples), else its `weight` of each."""
    weigh = getattr(objective, "step_weights", None)
    return weigh(model, micro_batches) if weigh else [objective.weight(batch) for batch in micro_batches]


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


def rank0_state_dict(module: Any, rank: int, adapters_only: bool,
                     whole: Callable[[torch.nn.Parameter], ContextManager[torch.Tensor]]) -> dict[str, torch.Tensor]:
    """`module`'s weights (only the trained ones for an adapter run: PEFT's save_pretrained
    picks the adapter keys out of them) on rank 0's CPU, each gathered from the workers'
    shards by `whole` one at a time, so no rank holds a sharded model twice. A collective
    where `whole` gathers: every rank calls it."""
    state = {}
    for name, param in module.named_parameters():
        if adapters_only and not param.requires_grad:
            continue
        with whole(param) as weight:
            if rank == 0:
                state[name] = weight.detach().to("cpu", copy=True)
    return state
