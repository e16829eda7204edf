"""The DDP engine (PyTorch DDP: NCCL on GPU, gloo on CPU), and `build_engine`, which picks
it, the DeepSpeed one (`deepspeed_engine`, ZeRO 0-3) or the FSDP2 one (`fsdp_engine`) for the
job. The interface they implement is written down in `engine_api.Engine`.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch

from ft_ray.config import JobConfig
from ft_ray.train.engine_api import Engine, TorchEngine
from ft_ray.train.objectives import Objective

TRAINER_STATE = "optimizer.pt"


class DDPEngine(TorchEngine):
    """One worker's share of a data-parallel run; gradients are averaged by DDP."""

    saves_on_every_rank = False  # every rank holds the same state: rank 0 writes it

    def __init__(self, model: Any, config: JobConfig, total_steps: int, objective: Objective):
        self.module = model
        self.model = data_parallel(model, config.distributed.use_gpu)
        self.device = next(self.module.parameters()).device
        self.setup(config, total_steps, objective)

    def save(self, folder: Path, rank: int) -> None:
        """Weights (adapter or full model, safetensors) and optimizer/scheduler state."""
        if rank != 0:
            return
        self.module.save_pretrained(folder / "model", safe_serialization=True)
        torch.save({"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()},
                   folder / TRAINER_STATE)

    def load(self, folder: Path) -> None:
        """Restore weights and optimizer/scheduler state saved by `save`."""
        from ft_ray.export import load_trainable_weights

        load_trainable_weights(self.module, folder / "model")
        state = torch.load(folder / TRAINER_STATE, map_location=self.device, weights_only=True)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])


def data_parallel(model: Any, use_gpu: bool) -> Any:
    """The model on this worker's device, wrapped in DDP when several workers train (Ray
    Train's `prepare_model`). Outside a Ray Train worker (benchmarks, a single process) the
    model is only moved to the GPU, so the same engine runs without Ray."""
    if "ray" not in sys.modules:  # not a Ray worker; importing Ray would only cost memory
        return model.to("cuda") if use_gpu and torch.cuda.is_available() else model
    import ray.train.torch

    try:
        return ray.train.torch.prepare_model(model)
    except RuntimeError as e:
        if "outside of a Ray Train" not in str(e):
            raise
        return model.to("cuda") if use_gpu and torch.cuda.is_available() else model


def build_engine(model: Any, config: JobConfig, total_steps: int, objective: Objective) -> Engine:
    """The job's engine: DeepSpeed's or FSDP2's for `distributed.strategy` deepspeed or fsdp,
    else DDP."""
    if config.distributed.strategy == "deepspeed":
        from ft_ray.train.deepspeed_engine import DeepSpeedEngine

        return DeepSpeedEngine(model, config, total_steps, objective)
    if config.distributed.strategy == "fsdp":
        from ft_ray.train.fsdp_engine import FSDPEngine

        return FSDPEngine(model, config, total_steps, objective)
    return DDPEngine(model, config, total_steps, objective)
