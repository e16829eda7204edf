"""Attention over packed sequences that skips the work across examples.

A packed sequence holds several examples; position ids restart at 0 where each begins.
Transformers' SDPA path turns that into a block-diagonal mask over the whole sequence, so
it still computes every query against every key (cost grows with the sequence length
squared). `packed_sdpa` runs causal SDPA on each example's own span instead (cost grows
with the sum of the examples' lengths squared) -- the varlen idea of flash attention,
with kernels every device has. Same result, fewer FLOPs; used for training batches, which
have no padding mask. On CUDA in bf16/fp16 the whole batch goes to flash attention's varlen
kernel in one call (`torch.nn.attention.varlen`, where this torch has it) instead of one
SDPA call per example. A layer with a sliding window keeps it (a banded mask per example
longer than the window; the varlen kernel's `window_size`). Latent attention's values,
narrower than its queries and keys (DeepSeek's), are padded to their width for the flash
kernels, which take one head size (else SDPA falls back to a kernel that keeps every
example's length-squared attention weights for backward), and the output cut back.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

import torch

NAME = "ft_ray_packed_sdpa"


def example_spans(position_ids: torch.Tensor) -> list[list[tuple[int, int]]]:
    """Per row, the (start, end) of each example: a span starts where the position is 0."""
    starts = (position_ids == 0).nonzero().tolist()  # one device sync per forward, shared by every layer
    length = position_ids.shape[-1]
    rows: list[list[int]] = [[] for _ in range(position_ids.shape[0])]
    for row, column in starts:
        rows[row].append(column)
    spans = []
    for row in rows:
        row = row if row and row[0] == 0 else [0, *row]
        spans.append(list(zip(row, row[1:] + [length])))
    return spans


def packed_sdpa(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                position_ids: torch.Tensor | None = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """Causal attention within each example of a packed batch. query [B, H, L, D], key and
    value [B, H_kv, L, D] (value's D may be smaller); returns [B, L, H, D] (value's D) like
    transformers' attention functions. A layer with a `sliding_window` (Mistral, Gemma 3's
    local layers, Phi-3) attends to the last `sliding_window` positions of its example only,
    as transformers' masks say."""
    if attention_mask is not None:
        raise ValueError(f"{NAME} is for packed training batches, which carry no attention mask")
    if position_ids is None:
        position_ids = torch.arange(query.shape[2], device=query.device).unsqueeze(0)
    spans = _cached_spans(position_ids)
    query, key, value = in_compute_dtype(query, key, value)
    width = value.shape[-1]
    if width < query.shape[-1]:
        value = torch.nn.functional.pad(value, (0, query.shape[-1] - width))
    out = _attend(query, key, value, spans, scaling, dropout, kwargs.get("sliding_window"))
    return (out if out.shape[-1] == width else out[..., :width]), None


def _attend(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, spans: list, scaling: float | None,
            dropout: float, window: int | None) -> torch.Tensor:
    """`packed_sdpa`'s attention of q, k and v of one head size: flash varlen in one call
    where it runs, else SDPA per example."""
    varlen = _varlen_attn()
    if varlen and query.is_cuda and query.dtype in (torch.bfloat16, torch.float16) and not dropout:
        out = varlen(query, key, value, spans, scaling, window)
        if out is not None:
            return out
    # split (not slices) into rows and examples: the backward of a split is one cat, while each
    # slice's backward writes a zero tensor the size of the whole batch (O(examples x batch) memory traffic)
    rows = []
    gqa = query.shape[1] != key.shape[1]
    for b, (q_row, k_row, v_row) in enumerate(zip(query.split(1), key.split(1), value.split(1))):
        lengths = [e - s for s, e in spans[b if len(spans) > 1 else 0]]
        pieces = [torch.nn.functional.scaled_dot_product_attention(
                      q, k, v, dropout_p=dropout, scale=scaling, enable_gqa=gqa,
                      **({"attn_mask": band(q.shape[2], window, q.device)} if window and q.shape[2] > window
                         else {"is_causal": True}))
                  for q, k, v in zip(q_row.split(lengths, dim=2), k_row.split(lengths, dim=2),
                                     v_row.split(lengths, dim=2))]
        rows.append(torch.cat(pieces, dim=2))
    return torch.cat(rows, dim=0).transpose(1, 2).contiguous()


def band(length: int, window: int, device: torch.device) -> torch.Tensor:
    """The causal sliding-window mask of one example: query i sees keys i - window + 1 to i."""
    return torch.ones(length, length, dtype=torch.bool, device=device).tril().triu(-(window - 1))


def in_compute_dtype(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The tensors in autocast's 16-bit dtype when autocast is on (what it does for SDPA).
    QLoRA's fp32 embeddings (PEFT's k-bit preparation keeps them so) make fp32 queries even
    under bf16 autocast, which would miss the 16-bit flash varlen kernel."""
    device = tensors[0].device.type
    if tensors[0].dtype != torch.float32 or not torch.is_autocast_enabled(device):
        return tensors
    dtype = torch.get_autocast_dtype(device)
    return tuple(t.to(dtype) for t in tensors)


def cumulative_lengths(spans: list[list[tuple[int, int]]], length: int) -> tuple[list[int], int]:
    """Flash varlen's view of a [B, L] batch flattened to B*L tokens: the offsets where each
    example starts (and the end), and the longest example."""
    offsets = [b * length + s for b, row in enumerate(spans) for s, _ in row] + [len(spans) * length]
    return offsets, max(e - s for row in spans for s, e in row)


@functools.cache
def _varlen_attn() -> Any:
    """A function (query, key, value, spans, scale) -> [B, L, H, D] over flash attention's
    varlen kernel, or None where this torch has none. Its arguments changed between torch
    releases (causality as `is_causal` or `window_size`, GQA as `enable_gqa` or not at all)."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    params = inspect.signature(varlen_attn).parameters
    options: dict[str, Any] = {"window_size": (-1, 0)} if "window_size" in params else {"is_causal": True}
    gqa = "enable_gqa" in params

    def attend(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, spans: list,
               scale: float | None, window: int | None = None) -> torch.Tensor | None:
        batch, heads, length, dim = query.shape
        if scale is not None and "scale" not in params and abs(scale - dim ** -0.5) > 1e-9:
            return None  # this torch's varlen kernel takes only the default scale
        if window and "window_size" not in params:
            return None  # causal only: no sliding window
        if key.shape[1] != heads and not gqa:
            key = key.repeat_interleave(heads // key.shape[1], dim=1)
            value = value.repeat_interleave(heads // value.shape[1], dim=1)
        cu, longest = _offsets_on_device(spans, batch, length, query.device)
        flat = [t.transpose(1, 2).reshape(batch * length, t.shape[1], dim) for t in (query, key, value)]
        extra = dict(options, enable_gqa=key.shape[1] != heads) if gqa else dict(options)
        if window:  # keys i - window + 1 to i, as the flash path of transformers has it
            extra["window_size"] = (window - 1, 0)
        if scale is not None and "scale" in params:
            extra["scale"] = scale
        out = varlen_attn(*flat, cu, cu, longest, longest, **extra)
        return out.view(batch, length, heads, dim)

    return attend


_last: tuple[Any, Any, dict] = (None, None, {})  # this forward's position ids, spans, spans' device offsets


def _cached_spans(position_ids: torch.Tensor) -> list[list[tuple[int, int]]]:
    """Every layer sees the same position ids: find the spans once per forward."""
    global _last
    if _last[0] is not position_ids:
        _last = (position_ids, example_spans(position_ids), {})
    return _last[1]


def _offsets_on_device(spans: list, batch: int, length: int, device: torch.device) -> tuple[torch.Tensor, int]:
    """`cumulative_lengths` as an int32 tensor on `device`: copied once per forward (kept with
    the forward's spans), not once per layer."""
    memo = _last[2] if spans is _last[1] else {}
    if (batch, length, device) not in memo:
        offsets, longest = cumulative_lengths(spans if len(spans) == batch else spans * batch, length)
        memo[batch, length, device] = (torch.tensor(offsets, dtype=torch.int32).to(device, non_blocking=True), longest)
    return memo[batch, length, device]


def register() -> str:
    """Make `packed_sdpa` a transformers attention implementation (no mask is built for it:
    the spans come from the position ids); returns its name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask

    AttentionInterface.register(NAME, packed_sdpa)
    AttentionMaskInterface.register(NAME, flash_attention_mask)
    return NAME
