"""Per-example attention in packed batches: the same outputs and gradients as transformers'
masked SDPA, computed on each example's span only."""

from __future__ import annotations

import pytest
import torch

from ft_ray.config import ModelConfig, config_from_dict
from ft_ray.models import load_base_model
from ft_ray.train.attention import (_varlen_attn, cumulative_lengths, example_spans, in_compute_dtype, packed_sdpa,
                                     register)
from ft_ray.train.modeling import build_model, use_fused_kernels


def test_spans_start_where_positions_restart():
    positions = torch.tensor([[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 4, 5]])
    assert example_spans(positions) == [[(0, 3), (3, 5), (5, 6)], [(0, 6)]]


def test_flash_varlen_offsets_flatten_the_batch():
    spans = [[(0, 3), (3, 5), (5, 6)], [(0, 6)]]
    assert cumulative_lengths(spans, 6) == ([0, 3, 5, 6, 12], 6)
    assert cumulative_lengths([[(0, 2), (2, 6)]], 6) == ([0, 2, 6], 4)


def test_fp32_queries_under_autocast_go_to_the_kernel_in_the_autocast_dtype():
    """QLoRA keeps embeddings in fp32, so its queries arrive in fp32 even under bf16 autocast."""
    tensors = [torch.randn(1, 4, 8, 16) for _ in "qkv"]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert {t.dtype for t in in_compute_dtype(*tensors)} == {torch.bfloat16}
    assert {t.dtype for t in in_compute_dtype(*tensors)} == {torch.float32}


@pytest.mark.skipif(not torch.cuda.is_available() or _varlen_attn() is None, reason="flash varlen needs CUDA")
@pytest.mark.parametrize("window, value_width", [(None, 64), (128, 64), (None, 48)])
def test_flash_varlen_matches_per_example_sdpa_on_cuda(window, value_width):
    """Flash varlen over the packed batch, with a sliding window, and with values narrower than
    queries and keys (latent attention's, padded for the kernel)."""
    from ft_ray.train.attention import band

    torch.manual_seed(0)
    positions = torch.stack([torch.cat([torch.arange(n) for n in lengths])
                             for lengths in ([400, 300, 324], [1024])]).cuda()
    query = torch.randn(2, 8, 1024, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    key, value = (torch.randn(2, 2, 1024, width, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                  for width in (64, value_width))
    flash, _ = packed_sdpa(None, query, key, value, None, scaling=64 ** -0.5, position_ids=positions,
                           sliding_window=window)
    flash.float().square().sum().backward()
    grads = [t.grad.clone() for t in (query, key, value)]
    for t in (query, key, value):
        t.grad = None
    spans = [[(0, 400), (400, 700), (700, 1024)], [(0, 1024)]]
    reference = torch.cat([torch.cat([torch.nn.functional.scaled_dot_product_attention(
        query[b:b + 1, :, s:e], key[b:b + 1, :, s:e], value[b:b + 1, :, s:e], enable_gqa=True,
        **({"attn_mask": band(e - s, window, "cuda")} if window else {"is_causal": True}))
        for s, e in row], dim=2) for b, row in enumerate(spans)]).transpose(1, 2)
    reference.float().square().sum().backward()
    torch.testing.assert_close(flash, reference, rtol=2e-2, atol=2e-2)
    for t, grad in zip((query, key, value), grads):
        torch.testing.assert_close(grad, t.grad, rtol=5e-2, atol=5e-2)


def windowed_mistral(window: int):
    """A random tiny Mistral whose layers attend to the last `window` positions (seeded: the same weights each call)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(1)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(
        "mistral", hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=800, sliding_window=window))


def latent_attention_model():
    """A random tiny DeepSeek-V3 (seeded): latent attention, whose values (16 features a head)
    are narrower than its queries and keys (24)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(1)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(
        "deepseek_v3", hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=4, q_lora_rank=48, kv_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16,
        head_dim=8, first_k_dense_replace=1, vocab_size=800))


@pytest.mark.parametrize("window", [None, 8, "latent"])
def test_packed_attention_matches_masked_sdpa_in_outputs_and_gradients(window):
    """The built-in Llama; a sliding window (Mistral, Gemma 3's local layers, Phi-3; 8 here,
    the examples longer and shorter): each layer sees only the last `sliding_window`
    positions of its example, as transformers' masks say (before 2026-12-06 the window was
    dropped: every earlier position of the example seen); latent attention (DeepSeek's), its
    values padded to the queries' width for the kernel and cut back after."""
    torch.manual_seed(0)
    ids = torch.randint(3, 700, (2, 96))
    positions = torch.stack([torch.cat([torch.arange(n) for n in lengths]) for lengths in ([40, 30, 26], [96])])
    results = []
    for implementation in ("sdpa", register()):
        model = (load_base_model(ModelConfig()) if window is None else latent_attention_model() if window == "latent"
                 else windowed_mistral(window))
        model.set_attn_implementation(implementation)
        loss = model(input_ids=ids, labels=ids, position_ids=positions, use_cache=False).loss
        loss.backward()
        attention = model.model.layers[0].self_attn
        results.append((loss.item(), (attention.q_proj or attention.kv_b_proj).weight.grad.clone()))
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


def test_flash_offsets_are_copied_to_the_device_once_per_forward():
    from ft_ray.train.attention import _cached_spans, _offsets_on_device

    spans = _cached_spans(torch.tensor([[0, 1, 2, 0, 1, 2]]))
    cu, longest = _offsets_on_device(spans, 2, 6, torch.device("cpu"))
    assert cu.tolist() == [0, 3, 6, 9, 12] and longest == 3 and cu.dtype == torch.int32
    assert _offsets_on_device(spans, 2, 6, torch.device("cpu"))[0] is cu  # the next layer of the same forward
    next_forward = _cached_spans(torch.tensor([[0, 1, 2, 3, 4, 5]]))
    assert _offsets_on_device(next_forward, 1, 6, torch.device("cpu"))[0].tolist() == [0, 6]
