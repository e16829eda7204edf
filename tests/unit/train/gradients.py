"""What the one-process objective tests compare: an objective's loss, metrics and the trained
weights' gradients from one backward pass, and two such passes' gradients against each other."""

from __future__ import annotations

import contextlib
from typing import Any

import torch


def objective_pass(model: Any, objective: Any, batch: dict, precision: str) -> tuple[float, dict, dict]:
    """`objective.loss(model, batch)` and its backward (under bf16 autocast for "bf16"): the
    loss, its metrics and a copy of each trained weight's gradient."""
    model.zero_grad(set_to_none=True)
    context = torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()
    with context:
        loss, metrics = objective.loss(model, batch)
    loss.backward()
    return loss.item(), metrics, {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def assert_same_gradients(got: dict, expected: dict, rel: float, unread: tuple[str, ...] = ()) -> None:
    """Every gradient of `expected` is non-zero (but those named with a part of `unread`) and
    matched by `got`'s within `rel` of its largest value."""
    assert got.keys() == expected.keys() and len(expected) > 0
    for name, grad in expected.items():
        scale = grad.abs().max().item()
        assert scale > 0 or any(part in name for part in unread), name
        assert torch.allclose(got[name], grad, atol=rel * 2 * scale), name
