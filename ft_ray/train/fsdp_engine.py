"""PyTorch FSDP2 (`fully_shard`) behind the engine interface: every decoder layer and the
model around them are sharded across the workers (weights, gradients and AdamW states, as
ZeRO-3 does), gathered a layer at a time for its forward and backward.

Precision: the sharded weights keep the dtype the model was built in (fp32 for a full
fine-tune, the 16-bit base and fp32 adapters for LoRA); with bf16/fp16 each layer is gathered
in that dtype (`MixedPrecisionPolicy`, half the traffic of fp32) and gradients are reduced in
fp32, under the same autocast as the DDP engine. QLoRA's layers are gathered as stored (the
4-bit weights packed in `quantization.quant_storage`, a float dtype so they can be sharded;
bitsandbytes keeps their quantization state on the module).

`distributed.fsdp.offload: cpu` keeps each worker's shards, their gradients and so AdamW's
states in CPU memory (torch's `CPUOffloadPolicy`): each layer is copied to the GPU for its
forward and backward, the optimizer steps on the CPU. The collectives over those CPU tensors
(the gradient norm, the weights gathered for a checkpoint) run over gloo beside NCCL
(`trainer.process_group_backend`).

Checkpoints: every rank writes its shard with `torch.distributed.checkpoint` (DCP) into
`fsdp/` of the same Ray checkpoint (the trained weights only: a LoRA run's frozen base is
the model it started from), rank 0 the gathered weights in the HF/PEFT layout (`model/`) and
the schedule. DCP re-shards on load, so a run resumes on another number of workers (elastic
ranges work), unlike ZeRO's shards.

GRPO samples its answers from the whole model, gathered on every worker for the generation
(`gathered`).
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from ft_ray.config import JobConfig
from ft_ray.models import causal_lm
from ft_ray.train.engine_api import COMPUTE_DTYPES, TorchEngine, rank0_state_dict, worker_device
from ft_ray.train.objectives import Objective

FSDP_FOLDER, SCHEDULE_FILE = "fsdp", "schedule.pt"


def shard_model(model: Any, config: JobConfig, device: torch.device, trains: bool = True,
                from_rank0: bool = False) -> None:
    """`fully_shard` each decoder layer (`decoder_layers`), then the causal LM around them
    (embeddings, final norm, output layer or score head; under PEFT's wrapper, which calls
    it), over all workers on `device`: each module's weights move there as it is sharded, so
    a worker never holds the whole model on its GPU. A frozen copy that only runs forward
    (`trains` false: an inline reference) gathers its outer weights for each forward too.
    `from_rank0` (`JobConfig.loads_on_rank0`): only rank 0 holds the weights, the others an
    empty model of the same layers (`load_from_rank0`). A collective then."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    # QLoRA's 4-bit weights are packed in their storage dtype: gathered as stored, never cast
    compute = COMPUTE_DTYPES.get(config.train.precision) if config.method != "qlora" else None
    policy = MixedPrecisionPolicy(param_dtype=compute, reduce_dtype=torch.float32 if compute else None)
    # the root: the causal LM (under PEFT's wrapper, which calls it), whose forward every forward and every
    # generation step runs through
    base = causal_lm(model)
    layers = decoder_layers(model)
    if not layers:
        raise RuntimeError(f"distributed.strategy fsdp: {type(base).__name__} has no decoder layers to shard by "
                           "(no _no_split_modules, no list of modules); use ddp or deepspeed")
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    reshard = config.distributed.fsdp.reshard_after_forward
    # distributed.fsdp.offload: the shards (and so their gradients and AdamW's states) in CPU memory, pinned for
    # the copies to a GPU
    offload = CPUOffloadPolicy(pin_memory=device.type == "cuda") if config.distributed.fsdp.offload == "cpu" else (
        OffloadPolicy())
    whole = model.state_dict() if from_rank0 and dist.get_rank() == 0 else {}  # kept whole until sent
    for layer in layers:
        fully_shard(layer, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard, offload_policy=offload)
        setattr(layer, RESHARD_AFTER_FORWARD, reshard)
    # the outer weights stay gathered from forward to backward: they are needed first in backward, and a
    # loss taken from inside the model (the reward model's score head, through a hook) never runs the
    # root's pre-backward hook that would gather them again (its backward then met freed storage)
    fully_shard(base, mesh=mesh, mp_policy=policy, reshard_after_forward=not trains, offload_policy=offload)
    if from_rank0:
        load_from_rank0(model, whole, device, offloaded=config.distributed.fsdp.offload == "cpu")


def weights_from_rank0(config: JobConfig) -> bool:
    """Whether this process's models take their weights from rank 0 (`JobConfig.loads_on_rank0`
    in a process group: a training worker, not a job's driver or `ft-ray eval` reading the run)."""
    import torch.distributed as dist

    return config.loads_on_rank0 and dist.is_initialized()


def builds_empty(config: JobConfig) -> bool:
    """Whether this worker builds the job's models empty (`weights_from_rank0`, a rank other than 0),
    their weights to come from rank 0 (`load_from_rank0`)."""
    import torch.distributed as dist

    return weights_from_rank0(config) and dist.get_rank() != 0


def rank0_answer(find: Callable[[], Any]) -> Any:
    """What `find` gives on rank 0, on every worker: what only a model with weights can tell
    (rows it mends, what a forward returns), where the others hold theirs empty. A collective."""
    import torch.distributed as dist

    found = [find() if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(found, src=0)
    return found[0]


def load_from_rank0(model: Any, whole: dict[str, torch.Tensor], device: torch.device, offloaded: bool) -> None:
    """Every worker's shards from rank 0's weights (`whole`, its state dict taken before
    sharding; {} on the others, whose model was built on the meta device and is given its
    memory here, in CPU memory where `offloaded`), sent one tensor at a time; and rank 0's
    buffers (RoPE's frequencies are in no state dict) to all, on `device`. A collective."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    if dist.get_rank() != 0:
        model.to_empty(device="cpu" if offloaded else device)
    for module in model.modules():
        for name, buffer in module.named_buffers(recurse=False):
            if buffer.device != device:
                setattr(module, name, buffer.to(device))
    set_model_state_dict(model, whole, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    for buffer in model.buffers():
        dist.broadcast(buffer, src=0)


def decoder_layers(model: Any) -> list[torch.nn.Module]:
    """The modules FSDP shards one by one: those of the classes the causal LM names in
    `_no_split_modules` (transformers' decoder layers) or, for a model that names none (remote
    code), the items of its largest `ModuleList` by weights (its layers, not a layer's experts)."""
    kinds = set(getattr(causal_lm(model), "_no_split_modules", None) or ())
    layers = [m for m in model.modules() if type(m).__name__ in kinds]
    if layers:
        return layers
    lists = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList)]
    return list(max(lists, key=lambda items: sum(p.numel() for p in items.parameters()), default=[]))


RESHARD_AFTER_FORWARD = "ft_ray_reshard_after_forward"  # a sharded module's setting, restored after `gathered`


@contextlib.contextmanager
def gathered(model: Any) -> Iterator[None]:
    """Every weight of an FSDP-sharded `model` gathered on each worker for the block, and kept
    so after each forward: generation runs a forward per token, and workers whose answers end
    at other lengths run other numbers of them (a gather per forward would wait for the others
    forever). Holds the whole model in the compute dtype meanwhile, as TRL gathers ZeRO-3's
    weights to generate. A collective; a no-op for a model that is not sharded."""
    from torch.distributed.fsdp import FSDPModule

    sharded = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for module in sharded:
        module.unshard()
        module.set_reshard_after_forward(False, recurse=False)
    try:
        yield
    finally:
        for module in sharded:
            module.set_reshard_after_forward(getattr(module, RESHARD_AFTER_FORWARD, False), recurse=False)
            module.reshard()


class FSDPEngine(TorchEngine):
    """One worker's shard of an FSDP2 run; gradients are reduce-scattered every micro step
    (the shard's, not a whole model's, are kept between micro steps)."""

    saves_on_every_rank = True

    def __init__(self, model: Any, config: JobConfig, total_steps: int, objective: Objective):
        self.device = worker_device(config.distributed.use_gpu)
        shard_model(model, config, self.device, from_rank0=config.loads_on_rank0)
        self.module = self.model = model  # sharded in place
        self.frozen_base = config.trains_adapter
        self.setup(config, total_steps, objective)

    def state_dicts(self) -> tuple[dict[str, Any], dict[str, Any], Any]:
        """The sharded model (its trained weights) and optimizer state dicts DCP saves and
        loads, and the options that made them."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

        # a LoRA run's frozen base is left out, and so not expected back on load
        options = StateDictOptions(ignore_frozen_params=self.frozen_base, strict=not self.frozen_base)
        model_state, optimizer_state = get_state_dict(self.model, self.optimizer, options=options)
        return model_state, optimizer_state, options

    def save(self, folder: Path, rank: int) -> None:
        """Every rank: its shard of the trained weights and optimizer states (DCP); rank 0
        also the gathered weights as an adapter or HF model in safetensors, and the schedule.
        A collective: every rank calls it."""
        import torch.distributed.checkpoint as dcp

        model_state, optimizer_state, _ = self.state_dicts()
        dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=str(folder / FSDP_FOLDER))
        state = self.gathered_state_dict(rank)
        if rank == 0:
            self.module.save_pretrained(folder / "model", state_dict=state, safe_serialization=True)
            torch.save({"scheduler": self.scheduler.state_dict()}, folder / SCHEDULE_FILE)

    def gathered_state_dict(self, rank: int) -> dict[str, torch.Tensor]:
        """The trained weights (for LoRA, the adapters and what trains whole) on rank 0. A collective."""
        return rank0_state_dict(self.module, rank, self.frozen_base, lambda param: contextlib.nullcontext(
            param.full_tensor() if hasattr(param, "full_tensor") else param))

    def load(self, folder: Path) -> None:
        """Restore the trained weights and optimizer states from the shards of any number of
        workers (DCP re-shards them to this run's), and the schedule."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import set_state_dict

        model_state, optimizer_state, options = self.state_dicts()
        saved = {"model": model_state, "optimizer": optimizer_state}
        dcp.load(saved, checkpoint_id=str(folder / FSDP_FOLDER))
        set_state_dict(self.model, self.optimizer, model_state_dict=saved["model"],
                       optim_state_dict=saved["optimizer"], options=options)
        schedule = torch.load(folder / SCHEDULE_FILE, map_location="cpu", weights_only=True)
        self.scheduler.load_state_dict(schedule["scheduler"])
