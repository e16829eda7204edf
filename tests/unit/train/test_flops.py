"""MFU's model FLOPs per token, checked against the formula by hand."""

import pytest

from ft_ray.config import LoraConfig, ModelConfig
from ft_ray.models import apply_lora, load_base_model
from ft_ray.train.flops import flops_per_token, peak_flops


@pytest.fixture(scope="module")
def base():
    return load_base_model(ModelConfig())


def test_full_fine_tune_is_6n_plus_attention(base):
    c = base.config
    embedding = c.vocab_size * c.hidden_size
    n = sum(p.numel() for p in base.parameters()) - embedding
    assert flops_per_token(base, "full", seq_len=256) == 6 * n + 12 * c.num_hidden_layers * c.hidden_size * 256


def test_lora_is_4n_plus_attention_plus_6_adapter():
    model = apply_lora(load_base_model(ModelConfig()), LoraConfig(rank=4, target_modules=["q_proj"]), "/base")
    c = model.config
    adapter = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    assert adapter == c.num_hidden_layers * 4 * (c.hidden_size + c.hidden_size)
    n = sum(p.numel() for n, p in model.named_parameters() if "lora_" not in n) - c.vocab_size * c.hidden_size
    assert flops_per_token(model, "lora", 128) == 4 * n + 12 * c.num_hidden_layers * c.hidden_size * 128 + 6 * adapter


def test_peak_is_configured_or_unknown_on_cpu():
    assert peak_flops(2.5, use_gpu=False, precision="fp32") == 2.5e12
    assert peak_flops(None, use_gpu=False, precision="fp32") is None
