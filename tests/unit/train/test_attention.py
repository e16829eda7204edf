"""Per-example attention in packed batches: the same outputs and gradients as transformers'
masked SDPA, computed on each example's span only."""

from __future__ import annotations

import pytest
import torch

from ft_ray.config import ModelConfig, config_from_dict
from ft_ray.models import load_base_model
from ft_ray.train.attention import example_spans, register
from ft_ray.train.loop import build_model, use_fused_kernels


def test_spans_start_where_positions_restart():
    positions = torch.tensor([[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 4, 5]])
    assert example_spans(positions) == [[(0, 3), (3, 5), (5, 6)], [(0, 6)]]


def test_packed_attention_matches_masked_sdpa_in_outputs_and_gradients():
    torch.manual_seed(0)
    ids = torch.randint(3, 700, (2, 96))
    positions = torch.stack([torch.cat([torch.arange(n) for n in lengths]) for lengths in ([40, 30, 26], [96])])
    results = []
    for implementation in ("sdpa", register()):
        model = load_base_model(ModelConfig())
        model.set_attn_implementation(implementation)
        loss = model(input_ids=ids, labels=ids, position_ids=positions, use_cache=False).loss
        loss.backward()
        results.append((loss.item(), model.model.layers[0].self_attn.q_proj.weight.grad.clone()))
    (reference, reference_grad), (packed, packed_grad) = results
    assert packed == pytest.approx(reference, rel=1e-5)
    torch.testing.assert_close(packed_grad, reference_grad, rtol=1e-4, atol=1e-6)


def test_training_models_use_it_for_packed_data_only():
    packed = config_from_dict({"data": {"train": "t.jsonl"}})
    assert build_model(packed, "builtin:tiny-llama").config._attn_implementation == register()
    unpacked = config_from_dict({"data": {"train": "t.jsonl", "pack": False}})
    assert build_model(unpacked, "builtin:tiny-llama").config._attn_implementation == "sdpa"


def test_fused_kernels_are_for_gpus():
    model = load_base_model(ModelConfig())
    assert not use_fused_kernels(model, config_from_dict({"data": {"train": "t.jsonl"}}))  # auto on CPU: plain torch
    insisted = config_from_dict({"data": {"train": "t.jsonl"}, "train": {"fused_kernels": "liger"}})
    with pytest.raises(RuntimeError, match="train.fused_kernels: liger needs a CUDA GPU"):
        use_fused_kernels(model, insisted)
