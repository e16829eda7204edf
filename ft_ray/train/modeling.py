"""The model a worker trains: the base model (4-bit for QLoRA) with the project's fast paths
and per-example attention, wrapped with LoRA unless the method is a full fine-tune."""

from __future__ import annotations

import math
import warnings
from typing import Any, Callable

import torch

from ft_ray.config import JobConfig
from ft_ray.console import LOG
from ft_ray.train.deepspeed_engine import partitioned_at_load, peft_reads_partitioned
from ft_ray.train.engine_api import COMPUTE_DTYPES
from ft_ray.train.fsdp_engine import builds_empty, rank0_answer, weights_from_rank0
from ft_ray.train.fast_paths import (
    chunked_lm_head, embedding_rows_beside, fuse_lora_layers, head_gives_logits, recompute_swiglu_product,
    residual_in_compute_dtype,
)


def build_model(config: JobConfig, base_model_path: str) -> Any:
    """The base model (4-bit for QLoRA), wrapped with LoRA unless the method is a full fine-tune."""
    from ft_ray.models import (added_token_ids, apply_lora, continue_adapter, load_base_model, load_quantized_model,
                               mend_untrained_tokens, trained_in_full, whole_shape)

    compute_dtype = COMPUTE_DTYPES.get(config.train.precision)  # None: fp32, no autocast
    # distributed.fsdp.cpu_ram_efficient_loading: the other workers build the model empty; their shards come from
    # rank 0's weights once sharded (`fsdp_engine.shard_model`)
    empty = builds_empty(config)
    if config.method == "qlora":
        model = load_quantized_model(config.model, config.quantization, config.train.gradient_checkpointing,
                                     scores=config.scores)
    else:
        # a frozen base (LoRA) is kept in the 16-bit compute dtype: fp32 would cost twice the
        # memory and a cast of every weight in every autocast forward; trained weights stay fp32
        with partitioned_at_load(config):  # ZeRO-3: built partitioned, rank 0 alone reading the weights
            model = load_base_model(config.model, dtype=compute_dtype if config.trains_adapter else None,
                                    scores=config.scores, empty=empty)
        if config.train.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.enable_input_require_grads()  # frozen embeddings would cut the graph for LoRA

    def rows_to_train() -> list[int]:  # token rows an adapter run trains: those the base never trained, added ones
        return sorted({*mend_untrained_tokens(model, config.model), *added_token_ids(config.model)})

    if weights_from_rank0(config):  # what rank 0 finds in the weights and by a forward, which an empty model cannot
        tokens, plain_logits = rank0_answer(lambda: (rows_to_train(), config.uses_fast_paths and head_gives_logits(model)))
    else:
        tokens, plain_logits = rows_to_train(), None  # plain_logits: found out by chunked_lm_head
    def head(liger: bool) -> None:
        # the head's loss or log-probs without the whole logits; liger's loss where it runs, but
        # for an adapter's trained token rows (liger would train them through a copy of the head)
        chunked_lm_head(model, sft_loss=not liger or bool(tokens and config.trains_adapter), plain_logits=plain_logits)

    forward_as_trained(model, config, head if config.uses_fast_paths else None)
    if config.recomputes_swiglu:
        recompute_swiglu_product(model)
    if config.trains_adapter:
        in_full = trained_in_full(config.model)
        if in_full:
            size = sum(math.prod(whole_shape(p)) * 4 for n, p in model.named_parameters()
                       if any(n.split(".")[-2] == m for m in in_full))
            LOG.info(f"note: model.add_tokens with new_tokens: whole: {' and '.join(in_full)} train in full and are "
                     f"saved with the adapter (+{size / 2**20:.1f} MiB in fp32)")
        with peft_reads_partitioned(model, config, token_rows=bool(tokens or config.model.adapter)):
            if config.model.adapter:  # an adapter trained before: on from where it is
                model = continue_adapter(model, config, base_model_path, tokens)
            else:  # built empty (fsdp), rank 0's A and B (and base weights, pissa's residual) come with the rest
                lora = config.lora.model_copy(update={"init": "default"}) if empty else config.lora
                model = apply_lora(model, lora, base_model_path, in_full, scores=config.scores, tokens=tokens)
        # what trains whole (a reward model's new score head, lora.modules_to_save, the embeddings
        # and output layer of added tokens) is copied from the 16-bit base: in fp32 as every trained weight
        for parameter in model.parameters():
            if parameter.requires_grad and parameter.dtype != torch.float32:
                parameter.data = parameter.data.float()
        if config.lora.use_dora and config.train.fused_kernels != "none":
            LOG.info("note: lora.use_dora: the fused LoRA forward is off (DoRA rescales the whole "
                     "output; PEFT's forward is used)")
        elif config.fuses_lora:
            fuse_lora_layers(model)  # exact for plain LoRA, rsLoRA (its scaling) and any init
        if tokens:
            embedding_rows_beside(model)
    if config.train.neftune_alpha:
        add_embedding_noise(model, config.train.neftune_alpha)
    model.config.use_cache = False
    model.train()  # from_pretrained gives a model in eval mode: a resumed run has no step-0 evaluation to end it
    if config.train.compile:
        model.compile()  # in place: the module (and save_pretrained) stay as they are
    return model


def add_embedding_noise(model: Any, alpha: float) -> None:
    """NEFTune (Jain et al., 2023): while the model trains, uniform noise in [-m, m] is added to
    its input embeddings, m = alpha / sqrt(L * d) for an example of L tokens and d dimensions.
    In a packed row each example has its own L, read from the position ids (they restart at 0
    per example); without them the row is one example. Evaluation and generation see none."""
    lengths: dict[str, torch.Tensor | None] = {}

    def remember_lengths(_module: Any, args: tuple, kwargs: dict) -> None:
        positions = kwargs.get("position_ids")
        lengths["tokens"] = None if positions is None else example_lengths(positions)

    def add_noise(module: Any, _args: tuple, output: torch.Tensor) -> torch.Tensor:
        if not module.training:
            return output
        tokens = lengths.get("tokens")
        count = tokens.unsqueeze(-1) if tokens is not None and tokens.shape == output.shape[:2] else output.shape[1]
        scale = alpha / torch.sqrt(torch.as_tensor(count * output.shape[-1], dtype=torch.float32, device=output.device))
        return output + (torch.rand_like(output) * 2 - 1) * scale.to(output.dtype)

    model.register_forward_pre_hook(remember_lengths, with_kwargs=True)
    model.get_input_embeddings().register_forward_hook(add_noise)


def example_lengths(positions: torch.Tensor) -> torch.Tensor:
    """Per token, the length of the example it belongs to in a packed row (position ids
    restart at 0 where each example starts)."""
    rows, width = positions.shape
    starts = positions == 0
    starts[:, 0] = True
    example = torch.cumsum(starts.long(), dim=1) + torch.arange(rows, device=positions.device).unsqueeze(1) * width
    return torch.bincount(example.flatten(), minlength=rows * width + 1)[example]


def forward_as_trained(model: Any, config: JobConfig, head: Callable[[bool], None] | None) -> None:
    """The forward paths of the job's model, the trained one (`build_model`) and its reference
    (`preference.reference_model`) alike, so that the two give the same log-probs to the last
    bit where training starts: liger's layers on CUDA (`use_fused_kernels`), then `head` (the
    chunked head, told whether liger's layers are on), the residual stream in the compute dtype
    (`residual_in_compute_dtype`, unless `train.fp32_residual`), and per-example attention
    spans in packed batches."""
    liger = use_fused_kernels(model, config)
    if head:
        head(liger)
    compute = COMPUTE_DTYPES.get(config.train.precision)
    if compute and not config.train.fp32_residual:
        residual_in_compute_dtype(model, compute)
    if config.data.pack and config.model.attn_implementation == "sdpa":
        from ft_ray.train.attention import register

        model.set_attn_implementation(register())


def use_fused_kernels(model: Any, config: JobConfig) -> bool:
    """Swap in liger-kernel's fused layers (RMSNorm, RoPE, SwiGLU, linear + cross-entropy)
    on CUDA; returns whether it did. `fused_kernels: liger` insists (an error if it cannot)."""
    choice = config.train.fused_kernels
    if choice == "none" or not (config.distributed.use_gpu and torch.cuda.is_available()):
        if choice == "liger":
            raise RuntimeError("train.fused_kernels: liger needs a CUDA GPU (distributed.use_gpu: true); use auto")
        return False
    try:
        from liger_kernel.transformers import _apply_liger_kernel_to_instance
    except ImportError:
        if choice == "liger":
            raise RuntimeError("train.fused_kernels: liger needs the liger-kernel package (pip install ft-ray[gpu])")
        return False
    try:
        _apply_liger_kernel_to_instance(model=model)
    except Exception as e:  # a model type or transformers release this liger does not know
        if choice == "liger":
            raise RuntimeError(f"train.fused_kernels: liger could not patch this model: {e}") from e
        warnings.warn(f"train.fused_kernels auto: liger-kernel not used ({e}); plain torch layers")
        return False
    return True
