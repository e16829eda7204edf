"""Model FLOPs per token and the device peak, for MFU (model FLOPs utilisation).

FLOPs per trained token (PaLM, appendix B): 6N for a full fine-tune (forward 2N, backward
4N) plus 12·L·d·T for attention scores and values at sequence length T. A LoRA or QLoRA
step skips the weight gradients of the frozen base (4N instead of 6N) and trains the
adapter fully (6N_adapter). N counts matmul weights: the input embedding is a lookup.
"""

from __future__ import annotations

from typing import Any

# Dense bf16/fp16 peak TFLOP/s by device name, for the default peak (no sparsity).
KNOWN_PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0, "L4": 121.0}


def flops_per_token(model: Any, method: str, seq_len: int) -> float:
    """Training FLOPs per token of `model` (a PEFT model for LoRA/QLoRA)."""
    config = model.config
    adapter = sum(_numel(p) for n, p in model.named_parameters() if "lora_" in n)
    embeddings = model.get_input_embeddings()
    for wrapped in ("original_module", "base_layer"):  # the embedding beneath PEFT's trainable tokens, LoRA
        embeddings = getattr(embeddings, wrapped, None) or embeddings
    embedding = _numel(embeddings.weight)
    base = sum(_numel(p) for n, p in model.named_parameters() if "lora_" not in n) - embedding
    return training_flops(base, adapter, config.num_hidden_layers, config.hidden_size, method, seq_len)


def training_flops(base: int, adapter: int, layers: int, hidden: int, method: str, seq_len: int) -> float:
    """Training FLOPs per token from the counts: `base` matmul weights (the input embedding
    left out), `adapter` LoRA weights."""
    attention = 12 * layers * hidden * seq_len
    if method == "full":
        return 6 * base + attention
    return 4 * base + attention + 6 * adapter


def _numel(param: Any) -> int:
    """Logical element count; bitsandbytes packs two 4-bit weights per stored byte, and ZeRO-3
    holds a part of a weight built partitioned (its whole count: `ds_numel`)."""
    if hasattr(param, "ds_numel"):
        return param.ds_numel
    shape = getattr(getattr(param, "quant_state", None), "shape", None)
    if shape is not None:
        count = 1
        for dim in shape:
            count *= dim
        return count
    return param.numel()


def peak_flops(configured_tflops: float | None, use_gpu: bool, precision: str) -> float | None:
    """Peak FLOP/s of one worker's device: the configured value, else a known GPU's dense
    16-bit peak (for bf16/fp16 runs), else None (no MFU is reported)."""
    if configured_tflops:
        return configured_tflops * 1e12
    if not use_gpu or precision == "fp32":
        return None
    import torch

    name = torch.cuda.get_device_name()
    return next((tflops * 1e12 for key, tflops in KNOWN_PEAK_TFLOPS.items() if key in name), None)
