"""Less memory traffic per step: LoRA layers' forward in one GEMM epilogue, and the
residual stream in the compute dtype.

PEFT's `lora.Linear` computes `result + lora_B(lora_A(dropout(x.to(fp32)))) * scaling`: under
bf16 autocast it copies the input to fp32 (the adapter weights' dtype) and autocast copies it
back to bf16 for the matmul, then it writes lora_B's output, a scaled copy of it and the sum --
five passes over activations the size of the layer's input or output, in forward and again in
backward, for seven layers per block with `all-linear`. Those passes, not the FLOPs, made LoRA
slower per FLOP than a full fine-tune on a GPU.

`fused_forward` computes the same sum with the scale and the addition inside one GEMM
(`addmm`: result += scaling * (x A^T) B^T), with the input in the compute dtype. The adapter
weights stay fp32 (the optimizer's copy); their 16-bit copies are rank x features, small.
Layers that use a LoRA variant (DoRA), several adapters or merged weights keep PEFT's forward.
"""

from __future__ import annotations

import types
from typing import Any

import torch


def fused_forward(self: Any, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    active = [a for a in self.active_adapters if a in self.lora_A]
    if args or kwargs or self.disable_adapters or self.merged or len(active) != 1 or active[0] in self.lora_variant:
        return type(self).forward(self, x, *args, **kwargs)
    name = active[0]
    result = self.base_layer(x)
    dtype = result.dtype
    a_weight, b_weight = self.lora_A[name].weight, self.lora_B[name].weight
    down = torch.nn.functional.linear(self.lora_dropout[name](x).to(dtype), a_weight.to(dtype)).to(dtype)
    flat = result.reshape(-1, result.shape[-1])
    update = (down.reshape(-1, down.shape[-1]), b_weight.to(dtype).t())
    if type(self.base_layer) is torch.nn.Linear and result.is_contiguous():
        # in place: nn.Linear's backward does not need its output
        return flat.addmm_(*update, alpha=self.scaling[name]).view(result.shape)
    # quantized base layers (bitsandbytes' subclass nn.Linear): a new tensor, as PEFT clones their output
    return torch.addmm(flat, *update, alpha=self.scaling[name]).view(result.shape)


def fuse_lora_layers(model: Any) -> int:
    """Give every PEFT LoRA linear layer of `model` the fused forward; returns how many.
    Not for DeepSpeed ZeRO-3, which gathers a module's weights only inside its own forward
    (this forward reads lora_A's and lora_B's weights without calling them)."""
    from peft.tuners.lora.layer import Linear

    kinds: tuple[type, ...] = (Linear,)
    try:
        from peft.tuners.lora.bnb import Linear4bit

        kinds += (Linear4bit,)
    except ImportError:  # no bitsandbytes
        pass
    count = 0
    for module in model.modules():
        if isinstance(module, kinds):
            module.forward = types.MethodType(fused_forward, module)
            count += 1
    return count


def residual_in_compute_dtype(model: Any, dtype: torch.dtype) -> bool:
    """Keep the hidden states between decoder blocks in `dtype` (bf16/fp16) instead of fp32.

    With fp32 weights under autocast (a full fine-tune; QLoRA's fp32 embeddings), the
    embedding output is fp32, so every residual addition stays fp32 and every block saves
    fp32 norm inputs and casts the same normed input once per projection (q, k, v; gate, up),
    keeping each copy for backward. Casting the embedding output makes the stream 16-bit, as
    in a 16-bit model (Megatron-LM's default, `fp32_residual_connection: false`); the final
    norm gets it back in its weight's dtype, so the loss head sees what it saw before.
    Returns whether the model has the (embeddings, decoder with a final `norm`) it needs.
    """
    embeddings = model.get_input_embeddings()
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    norm = getattr(decoder, "norm", None)
    if embeddings is None or not isinstance(norm, torch.nn.Module):
        return False

    def to_compute(module: Any, args: Any, output: torch.Tensor) -> torch.Tensor:
        if not output.is_floating_point() or not torch.is_autocast_enabled(output.device.type):
            return output  # outside autocast the fp32 layers need fp32 inputs
        return output.to(dtype)

    def to_norm_dtype(module: Any, args: tuple) -> tuple:
        weight = getattr(module, "weight", None)
        if weight is None or not args or args[0].dtype == weight.dtype:
            return args
        return (args[0].to(weight.dtype), *args[1:])

    embeddings.register_forward_hook(to_compute)
    norm.register_forward_pre_hook(to_norm_dtype)
    return True
