"""DeepSpeed ZeRO (stages 0-3, optional CPU offload) behind the engine interface.

The DeepSpeed JSON is generated from the job (`deepspeed_config`), so batch sizes,
precision, optimizer and schedule can never disagree with the rest of the config;
`distributed.deepspeed.config_override` is merged last for expert settings.

Checkpoints: every rank writes its own ZeRO shard (a rank-0-only save hangs, as the save
is a collective) and reports it; Ray Train gathers all ranks' files into one checkpoint
folder. Weights for export are gathered parameter by parameter into the HF/PEFT layout
(`model/`), so a ZeRO-3 run exports like any other.
"""

from __future__ import annotations

import contextlib
import copy
from pathlib import Path
from typing import Any, Iterator

import torch

from ft_ray.config import JobConfig
from ft_ray.train.engine_api import (COMPUTE_DTYPES, build_optimizer, eval_loss_sum, lr_multiplier,
                                    micro_batch_weights, optimizer_groups, rank0_state_dict)
from ft_ray.train.objectives import Objective

DS_FOLDER, DS_TAG = "deepspeed", "state"


def deepspeed_config(config: JobConfig, total_steps: int) -> dict[str, Any]:
    """The DeepSpeed JSON of a job: batch sizes, precision, ZeRO, optimizer.

    The learning-rate schedule is not in it: DeepSpeed's WarmupCosineLR trains its first
    step at lr 0, so both engines share `engine_api.lr_multiplier`, handed to DeepSpeed as a
    client scheduler (saved and restored with its checkpoints all the same).
    """
    train, dist = config.train, config.distributed
    ds = dist.deepspeed
    zero: dict[str, Any] = {"stage": ds.stage, "overlap_comm": ds.overlap_comm, "contiguous_gradients": True}
    if ds.offload_optimizer != "none":
        zero["offload_optimizer"] = {"device": ds.offload_optimizer, "pin_memory": dist.use_gpu}
    if ds.stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True
        if ds.offload_params != "none":
            zero["offload_param"] = {"device": ds.offload_params, "pin_memory": dist.use_gpu}
    generated: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": train.micro_batch_size,
        "gradient_accumulation_steps": train.gradient_accumulation,
        "gradient_clipping": train.max_grad_norm,
        "zero_optimization": zero,
        "bf16": {"enabled": train.precision == "bf16"},
        "fp16": {"enabled": train.precision == "fp16"},
        "steps_per_print": 10 ** 9,
        "wall_clock_breakdown": False,
    }
    if train.optimizer == "adamw_8bit":  # bitsandbytes' AdamW8bit as a client optimizer over ZeRO's fp32 partitions
        generated["zero_allow_untested_optimizer"] = True
    else:
        params: dict[str, Any] = {"lr": train.learning_rate, "weight_decay": train.weight_decay,
                                  "betas": [0.9, 0.999], "eps": 1e-8}
        if not dist.use_gpu and ds.offload_optimizer == "none":
            params["torch_adam"] = True  # FusedAdam is CUDA-only
        generated["optimizer"] = {"type": "AdamW", "params": params}
    if not dist.elastic:  # with a worker range DeepSpeed derives it from the actual world size
        generated["train_batch_size"] = train.micro_batch_size * train.gradient_accumulation * dist.max_workers
    return merge(generated, ds.config_override)


def merge(base: dict, override: dict) -> dict:
    """`override` merged into a copy of `base`, nested dicts key by key."""
    merged = copy.deepcopy(base)
    for key, value in override.items():
        merged[key] = merge(merged[key], value) if isinstance(value, dict) and isinstance(merged.get(key), dict) else value
    return merged


def shards_weights(engine: Any) -> bool:
    """Whether `engine` is a DeepSpeed engine that partitions its model's weights (ZeRO-3)."""
    return bool(getattr(engine, "zero_optimization_partition_weights", lambda: False)())


@contextlib.contextmanager
def partitioned_at_load(config: JobConfig) -> Iterator[None]:
    """Models loaded in the block are built partitioned across the workers, and rank 0 alone
    reads their weights (transformers' from_pretrained under a live `HfDeepSpeedConfig`:
    `deepspeed.zero.Init`, then each weight gathered, written by rank 0 and partitioned
    again), where `JobConfig.partitions_at_load` in a process group; else nothing changes.
    DeepSpeed's engine takes such a model as it is, and broadcasts rank 0's values of the
    weights added after (LoRA's) when it partitions them."""
    import torch.distributed as dist

    if not (config.partitions_at_load and dist.is_initialized()):
        yield
        return
    import deepspeed
    from transformers.integrations.deepspeed import HfDeepSpeedConfig, unset_hf_deepspeed_config

    deepspeed.init_distributed(dist_init_required=False)  # zero.Init's collectives over the job's process group
    live = HfDeepSpeedConfig(deepspeed_config(config, total_steps=1))  # transformers holds a weak reference
    try:
        yield
    finally:
        unset_hf_deepspeed_config()
        del live


@contextlib.contextmanager
def peft_reads_partitioned(model: Any, config: JobConfig, token_rows: bool) -> Iterator[None]:
    """PEFT wrapping a `model` built partitioned (`partitioned_at_load`) in the block finds the
    weights it reads whole: it gathers them itself while the config lives (a continued adapter's
    or DoRA's norms, LoRA initialised from the weights, the modules it copies to train whole, a
    reward model's score head), but its ZeRO-3 path for trainable token rows broadcasts them as
    a CUDA tensor: on CPUs, where PEFT may train token rows (`token_rows`), every weight is
    gathered for the block instead and partitioned again from rank 0's values. A model not
    built partitioned is left as it is."""
    from ft_ray.models import built_partitioned, gathered_if_partitioned

    if not built_partitioned(model):
        yield
    elif token_rows and next(model.parameters()).device.type != "cuda":
        with gathered_if_partitioned(list(model.parameters()), modifier_rank=0):
            yield
    else:
        with partitioned_at_load(config):
            yield


@contextlib.contextmanager
def gathered(engine: Any) -> Iterator[None]:
    """Every weight of a ZeRO-3 `engine`'s model gathered on each worker for the block, its
    fetch-and-release hooks taken off meanwhile: generation runs a forward per token, each
    one gather instead of one per module (DeepSpeed's own `unwrap_model_for_generation`, as
    TRL's GRPO gathers). Holds the whole model in its 16-bit dtype meanwhile. The start of a
    forward may still be a collective (ZeRO-3's check of its trace, after a re-trace): workers
    run as many forwards as each other (`generate(synced_gpus=True)`). A collective."""
    from deepspeed.runtime.zero.stage3 import unwrap_model_for_generation

    with unwrap_model_for_generation(engine):
        yield


def cast_added_weights(model: Any, dtype: torch.dtype | None) -> None:
    """A model built partitioned (`partitioned_at_load`) is in DeepSpeed's 16-bit `dtype`
    already, and DeepSpeed casts none of it, as it casts every weight of a model it partitions
    itself: the weights added after (LoRA's, in fp32) are cast here alike. fp32 runs (`dtype`
    None) and whole models are left as they are."""
    from ft_ray.models import built_partitioned, partitioned

    if dtype is None or not built_partitioned(model):
        return
    for parameter in model.parameters():
        if not partitioned(parameter) and parameter.is_floating_point():
            parameter.data = parameter.data.to(dtype)


class DeepSpeedEngine:
    """One worker's DeepSpeed engine; gradient accumulation and clipping happen inside it."""

    saves_on_every_rank = True

    def __init__(self, model: Any, config: JobConfig, total_steps: int, objective: Objective):
        import deepspeed

        self.module, self.objective = model, objective
        self.zero_stage = config.distributed.deepspeed.stage
        self.lora = config.trains_adapter
        cast_added_weights(model, COMPUTE_DTYPES.get(config.train.precision))
        client = build_optimizer(model, config) if config.train.optimizer == "adamw_8bit" else None
        self.engine, _, _, _ = deepspeed.initialize(
            model=model, optimizer=client, model_parameters=None if client else optimizer_groups(model, config),
            config=deepspeed_config(config, total_steps),
            lr_scheduler=lambda optimizer: torch.optim.lr_scheduler.LambdaLR(
                optimizer, lr_multiplier(config.train, total_steps)),
            dist_init_required=False)
        self.device = self.engine.device

    def forward_loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        return self.objective.loss(self.engine, batch)

    def step_weights(self, micro_batches: list[dict[str, torch.Tensor]]) -> list[float]:
        return micro_batch_weights(self.objective, self.engine, micro_batches)

    def micro_step(self, batch: dict[str, torch.Tensor], scale: float, sync: bool) -> tuple[float, dict[str, float]]:
        """Forward, backward and DeepSpeed's step (it updates only at accumulation boundaries,
        and scales the loss by 1/accumulation itself: `scale` is applied times the accumulation)."""
        loss, metrics = self.forward_loss(batch)
        self.engine.backward(loss * (scale * self.engine.gradient_accumulation_steps()))
        self.engine.step()
        return loss.item(), metrics

    def step(self) -> float:
        """The update already happened in `micro_step`; returns its gradient norm."""
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")

    @property
    def lr(self) -> float:
        return self.engine.get_lr()[0]

    def eval_loss_sum(self, batch: dict[str, torch.Tensor]) -> tuple[float, int, dict[str, float]]:
        return eval_loss_sum(self.engine, self.forward_loss, self.objective, batch)

    def save(self, folder: Path, rank: int) -> None:
        """Every rank: its ZeRO shard (optimizer, scheduler, partitioned weights); rank 0 also
        the gathered weights as an adapter or HF model in safetensors."""
        self.engine.save_checkpoint(str(folder / DS_FOLDER), tag=DS_TAG)
        state = self.gathered_state_dict(rank)
        if rank == 0:
            self.module.save_pretrained(folder / "model", state_dict=state, safe_serialization=True)

    def gathered_state_dict(self, rank: int) -> dict[str, torch.Tensor]:
        """Full weights (adapter weights only for LoRA) on rank 0. A collective: all ranks call it."""
        import deepspeed

        @contextlib.contextmanager
        def whole(param: torch.nn.Parameter) -> Iterator[torch.Tensor]:
            with deepspeed.zero.GatheredParameters([param], modifier_rank=None, enabled=self.zero_stage == 3):
                yield param

        return rank0_state_dict(self.module, rank, self.lora, whole)

    def load(self, folder: Path) -> None:
        """Restore weights, optimizer and scheduler from every rank's shard, unpickled with
        torch's weights-only loader (DeepSpeed's own would run any pickle)."""
        self.engine.checkpoint_engine = weights_only_checkpoint_engine()
        path, _ = self.engine.load_checkpoint(str(folder / DS_FOLDER), tag=DS_TAG,
                                              load_optimizer_states=True, load_lr_scheduler_states=True)
        if path is None:
            raise RuntimeError(f"{folder}: no DeepSpeed checkpoint to resume from")


def weights_only_checkpoint_engine() -> Any:
    """DeepSpeed's torch checkpoint engine loading with `weights_only=True`: tensors, plain
    containers and the few DeepSpeed classes its ZeRO 0-3 files hold (with and without CPU
    offload, fp32 and bf16; found by loading such files), nothing else."""
    from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    allowed = [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]

    class WeightsOnlyCheckpointEngine(TorchCheckpointEngine):
        def load(self, path: str, map_location: Any = None) -> Any:
            with torch.serialization.safe_globals(allowed):
                return torch.load(path, map_location=map_location, weights_only=True)

    return WeightsOnlyCheckpointEngine()
