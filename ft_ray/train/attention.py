"""Attention over packed sequences that skips the work across examples.

A packed sequence holds several examples; position ids restart at 0 where each begins.
Transformers' SDPA path turns that into a block-diagonal mask over the whole sequence, so
it still computes every query against every key (cost grows with the sequence length
squared). `packed_sdpa` runs causal SDPA on each example's own span instead (cost grows
with the sum of the examples' lengths squared) -- the varlen idea of flash attention,
with kernels every device has. Same result, fewer FLOPs; used for training batches, which
have no padding mask.
"""

from __future__ import annotations

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
    value [B, H_kv, L, D]; returns [B, L, H, D] like transformers' attention functions."""
    if attention_mask is not None:
        raise ValueError(f"{NAME} is for packed training batches, which carry no attention mask")
    if position_ids is None:
        position_ids = torch.arange(query.shape[2], device=query.device).unsqueeze(0)
    spans = _cached_spans(position_ids)
    rows = []
    for b in range(query.shape[0]):
        pieces = [torch.nn.functional.scaled_dot_product_attention(
            query[b:b + 1, :, s:e], key[b:b + 1, :, s:e], value[b:b + 1, :, s:e], is_causal=True,
            dropout_p=dropout, scale=scaling, enable_gqa=query.shape[1] != key.shape[1])
            for s, e in spans[b if len(spans) > 1 else 0]]
        rows.append(torch.cat(pieces, dim=2))
    return torch.cat(rows, dim=0).transpose(1, 2).contiguous(), None


_last: tuple[Any, Any] = (None, None)


def _cached_spans(position_ids: torch.Tensor) -> list[list[tuple[int, int]]]:
    """Every layer sees the same position ids: find the spans once per forward."""
    global _last
    if _last[0] is not position_ids:
        _last = (position_ids, example_spans(position_ids))
    return _last[1]


def register() -> str:
    """Make `packed_sdpa` a transformers attention implementation (no mask is built for it:
    the spans come from the position ids); returns its name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask

    AttentionInterface.register(NAME, packed_sdpa)
    AttentionMaskInterface.register(NAME, flash_attention_mask)
    return NAME
