"""The fused LoRA forward computes what PEFT's does (outputs and gradients), and the residual
stream in the compute dtype saves activation memory without changing the loss much."""

from __future__ import annotations

import contextlib

import pytest
import torch

from ft_ray.config import ModelConfig, config_from_dict
from ft_ray.models import load_base_model
from ft_ray.train.fast_paths import fused_forward
from ft_ray.train.modeling import build_model


def job(method: str = "lora", **train):
    return config_from_dict({"method": method, "data": {"train": "t.jsonl"}, "train": train,
                             "lora": {"rank": 8, "alpha": 16, "dropout": 0.1, "target_modules": "all-linear"}})


def lora_layers(model):
    return [m for m in model.modules() if hasattr(m, "lora_A") and hasattr(m, "base_layer")]


def batch():
    torch.manual_seed(1)
    ids = torch.randint(3, 700, (2, 64))
    positions = torch.stack([torch.cat([torch.arange(n) for n in lengths]) for lengths in ([40, 24], [64])])
    return {"input_ids": ids, "labels": ids, "position_ids": positions}


def loss_and_grads(model, autocast: bool):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(2)  # the same dropout masks in both runs
    context = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
    device = next(model.parameters()).device  # QLoRA loads on the GPU where there is one
    with context:
        loss = model(**{k: v.to(device) for k, v in batch().items()}, use_cache=False).loss
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("method,precision", [("lora", "fp32"), ("lora", "bf16"), ("qlora", "fp32")])
def test_fused_lora_matches_peft_in_loss_and_gradients(method, precision):
    config = job(method, precision=precision)
    if method == "qlora":
        config = config.model_copy(update={"quantization": config.quantization.model_copy(
            update={"compute_dtype": "float32"})})
    model = build_model(config, "builtin:tiny-llama")
    layers = lora_layers(model)
    assert layers and all(getattr(m.forward, "__func__", None) is fused_forward for m in layers)
    torch.manual_seed(0)
    for name, p in model.named_parameters():
        if p.requires_grad:  # PEFT starts B at zero: make the update and every gradient non-trivial
            p.data.normal_(std=0.05)
    model.train()
    fused = loss_and_grads(model, precision == "bf16")
    for m in layers:
        del m.forward  # back to PEFT's own forward
    peft = loss_and_grads(model, precision == "bf16")
    assert fused[1].keys() == peft[1].keys() and len(fused[1]) == 2 * len(layers)
    assert all(grad.abs().sum() > 0 for grad in fused[1].values())
    if precision == "fp32":
        assert fused[0] == pytest.approx(peft[0], rel=1e-5)
        for name, grad in fused[1].items():
            torch.testing.assert_close(grad, peft[1][name], rtol=1e-4, atol=1e-6)
        return
    # bf16 rounds in different places (PEFT: B's output, its scaled copy and the sum; fused: the
    # sum, once): both must be as close to the fp32 computation of the same weights
    exact = loss_and_grads(model.float(), False)

    def error(result) -> float:
        return sum(float((g - exact[1][n]).square().sum()) for n, g in result[1].items()) ** 0.5

    assert abs(fused[0] - exact[0]) <= abs(peft[0] - exact[0]) + 2e-3 * exact[0]
    assert error(fused) <= 1.2 * error(peft)


def test_disabled_adapters_and_other_setups_keep_peft_forward():
    model = build_model(job(), "builtin:tiny-llama")
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(std=0.05)
    model.eval()
    ids = batch()["input_ids"]
    with torch.no_grad():
        adapted = model(input_ids=ids).logits
        with model.disable_adapter():
            base = model(input_ids=ids).logits
        plain = load_base_model(ModelConfig())(input_ids=ids).logits  # the base model, never wrapped
    assert not torch.allclose(adapted, base, atol=1e-3)
    torch.testing.assert_close(base, plain, rtol=1e-5, atol=1e-5)
    unfused = build_model(job(fused_kernels="none"), "builtin:tiny-llama")
    assert all("forward" not in vars(m) for m in lora_layers(unfused))
    zero3 = config_from_dict({"data": {"train": "t.jsonl"}, "distributed": {"strategy": "deepspeed",
                                                                          "deepspeed": {"stage": 3}}})
    assert all("forward" not in vars(m) for m in lora_layers(build_model(zero3, "builtin:tiny-llama")))


def hidden_dtypes_and_saved_bytes(model) -> tuple[set, int, float]:
    dtypes: set = set()
    for layer in model.model.layers:
        layer.register_forward_pre_hook(lambda m, args: dtypes.add(args[0].dtype))
    saved = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.dim() >= 3:  # activations ([batch, tokens, ...], [batch, heads, tokens, dim]), not weight copies
            saved.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(**batch(), use_cache=False).loss
    loss.backward()
    return dtypes, sum(saved), loss.item()


@pytest.mark.parametrize("experts", [False, True])
def test_residual_stream_in_the_compute_dtype_saves_activation_memory(tmp_path, experts):
    """The built-in Llama, and a tiny Qwen3-MoE (3 layers), whose fp32 expert weights' output
    made the stream fp32 again from its second layer on before every layer's output was cast
    (2026-12-07)."""
    from tests.conftest import tiny_moe

    model = tiny_moe(tmp_path / "moe", num_hidden_layers=3).name_or_path if experts else "builtin:tiny-llama"

    def built(config):
        return build_model(config.model_copy(update={"model": config.model.model_copy(update={
            "name_or_path": model})}), model)

    torch.manual_seed(0)
    fp32_dtypes, fp32_bytes, fp32_loss = hidden_dtypes_and_saved_bytes(
        built(job("full", precision="bf16", fp32_residual=True)))
    torch.manual_seed(0)
    dtypes, saved_bytes, loss = hidden_dtypes_and_saved_bytes(built(job("full", precision="bf16")))
    assert fp32_dtypes == {torch.float32} and dtypes == {torch.bfloat16}
    print(f"saved activations: {saved_bytes / fp32_bytes:.2f} of the fp32 residual's")
    assert saved_bytes < 0.93 * fp32_bytes  # 0.89 with the tiny model's plain RMSNorm; liger's saves more
    assert loss == pytest.approx(fp32_loss, rel=2e-2)
    model = build_model(job("full", precision="bf16"), "builtin:tiny-llama")
    with torch.no_grad():  # outside autocast (generation, export checks) the model stays fp32 throughout
        assert model(input_ids=batch()["input_ids"]).logits.dtype == torch.float32


def full_loss_and_grads(device: str, **train):
    config = job("full", **train)
    if device == "cuda":
        config = config.model_copy(update={"distributed": config.distributed.model_copy(update={"use_gpu": True})})
    model = build_model(config, "builtin:tiny-llama").to(device)
    saved = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.dim() >= 3:
            saved.append(t.numel() * t.element_size())
        return t

    autocast = torch.autocast(device, dtype=torch.bfloat16) if train.get("precision") == "bf16" else contextlib.nullcontext()
    inputs = {k: v.to(device) for k, v in batch().items()}
    held = torch.cuda.memory_allocated() if device == "cuda" else 0
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast:
        loss = model(**inputs, use_cache=False).loss
    # on CUDA liger's functions save 2-D views, so count the memory the graph holds instead
    held = torch.cuda.memory_allocated() - held if device == "cuda" else sum(saved)
    loss.backward()
    return model, loss.item(), {n: p.grad for n, p in model.named_parameters()}, held


def test_recomputed_swiglu_product_gives_the_same_gradients_and_saves_less():
    model, loss, grads, saved = full_loss_and_grads("cpu")
    mlps = [m for m in model.modules() if hasattr(m, "down_proj")]
    assert mlps and all("forward" in vars(m) for m in mlps)
    _, reference_loss, reference_grads, reference_saved = full_loss_and_grads("cpu", recompute_swiglu=False)
    assert loss == pytest.approx(reference_loss, rel=1e-6)
    assert grads.keys() == reference_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, reference_grads[name], rtol=1e-4, atol=1e-6)
    print(f"saved activations: {saved / reference_saved:.2f} of the plain MLP's")
    assert saved < 0.9 * reference_saved
    lora = build_model(job("lora"), "builtin:tiny-llama")  # frozen down_proj weights never save the product
    assert not any("forward" in vars(m) for m in lora.modules() if hasattr(m, "down_proj"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="liger-kernel's SwiGLU needs CUDA")
def test_recomputed_liger_swiglu_on_cuda_matches_liger():
    _, loss, grads, saved = full_loss_and_grads("cuda", precision="bf16")
    _, reference_loss, reference_grads, reference_saved = full_loss_and_grads("cuda", precision="bf16",
                                                                              recompute_swiglu=False)
    assert loss == pytest.approx(reference_loss, rel=1e-2)
    error = sum(float((g.float() - reference_grads[n].float()).square().sum()) for n, g in grads.items()) ** 0.5
    norm = sum(float(g.float().square().sum()) for g in reference_grads.values()) ** 0.5
    assert error < 2e-2 * norm
    assert saved < reference_saved


@pytest.mark.parametrize("method,precision,tokens", [("full", "fp32", None), ("lora", "bf16", None),
                                                    ("lora", "bf16", "added"), ("lora", "fp32", "untrained")])
def test_the_chunked_lm_head_loss_matches_the_model_s_own(method, precision, tokens, monkeypatch, tmp_path):
    """The loss from the LM head in chunks (16 rows each here: 8 chunks of the 128 tokens, the
    ignored labels of padding and prompts among them) equals the model's own head and loss, in
    value and in every gradient (the head's own in a full fine-tune, the head's trained copy
    PEFT puts in after the patch when LoRA adds tokens, and the trained rows of special tokens
    the base never trained), and in evaluation."""
    from ft_ray.train import fast_paths
    from tests.conftest import UNTRAINED, untrained_llama

    monkeypatch.setattr(fast_paths, "LOGITS_CHUNK_BYTES", 4 * 768 * 16)  # the tiny Llama's vocabulary: 768
    config = job(method, precision=precision)
    base = "builtin:tiny-llama"
    if tokens == "added":
        config.model.add_tokens = ["<|house|>"]
        config.model.new_tokens = "whole"  # embed_tokens and lm_head train in full
    elif tokens == "untrained":
        base = config.model.name_or_path = str(untrained_llama(tmp_path / "base"))
    model = build_model(config, base)
    causal = model.get_base_model() if method == "lora" else model
    assert "forward" in vars(causal)  # applied on the CPU (no liger)
    torch.manual_seed(0)
    for p in model.parameters():
        if p.requires_grad and method == "lora":
            p.data.normal_(std=0.05)
    model.train()
    labelled = batch()
    if tokens == "untrained":  # in the inputs and the labels (the first 30 labels are ignored below)
        labelled["input_ids"][:, 40:48] = torch.tensor(UNTRAINED * 2)
    labelled["labels"] = labelled["labels"].clone()
    labelled["labels"][0, :30] = -100  # a prompt's tokens

    def run():
        model.zero_grad(set_to_none=True)
        torch.manual_seed(2)  # the same dropout masks in both runs
        context = torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()
        with context:
            loss = model(**labelled, use_cache=False).loss
        loss.backward()
        with torch.no_grad(), context:
            evaluated = model(**labelled, use_cache=False).loss.item()
        return loss.item(), evaluated, {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    chunked = run()
    del causal.forward  # the model's own forward: full logits, HF's loss
    plain = run()
    tolerance = 2e-2 if precision == "bf16" else 1e-5
    assert chunked[0] == pytest.approx(plain[0], rel=1e-3 if precision == "bf16" else 1e-6)
    assert chunked[1] == pytest.approx(plain[1], rel=1e-3 if precision == "bf16" else 1e-6)
    assert chunked[2].keys() == plain[2].keys()
    if method == "full":
        assert any("lm_head" in n or "embed_tokens" in n for n in chunked[2])  # the head's weight trains
    if tokens == "added":  # trained whole, copied from the bf16 base into fp32 as every trained weight
        assert chunked[2]["base_model.model.lm_head.modules_to_save.default.weight"].dtype == torch.float32
    if tokens == "untrained":  # the head's rows came apart from it, not from a copy of the whole head
        assert chunked[2]["base_model.model.lm_head.token_adapter.trainable_tokens_delta.default"].abs().max() > 0
        assert fast_paths.head_parts(model.get_output_embeddings())[1] is not None
    for name, grad in plain[2].items():
        assert torch.allclose(chunked[2][name].float(), grad.float(), atol=tolerance * grad.abs().max().item() + 1e-8), name


def test_trained_token_rows_are_looked_up_beside_the_embedding_not_copied_into_it(tmp_path):
    """The rows of special tokens the base never trained (`model.untrained_tokens: mend`) train
    through PEFT's trainable tokens; ft-ray's embedding forward looks them up beside the frozen
    embedding: the same outputs and row gradients as PEFT's, and no tensor the size of the
    embedding made in forward or backward (PEFT's copies it with the rows written each step)."""
    from torch.utils._pytree import tree_leaves
    from torch.utils._python_dispatch import TorchDispatchMode

    from tests.conftest import UNTRAINED, untrained_llama

    class Shapes(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.made = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            self.made += [tuple(t.shape) for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
            return out

    config = job(precision="fp32")
    config.model.name_or_path = str(untrained_llama(tmp_path / "base"))
    embedding = build_model(config, config.model.name_or_path).get_input_embeddings().token_adapter
    assert "forward" in vars(embedding)  # ft-ray's
    rows = embedding.trainable_tokens_delta["default"]
    with torch.no_grad():
        rows.normal_(std=0.5)
    ids = torch.tensor([[9, *UNTRAINED, 40, UNTRAINED[1], 700]])
    weights = torch.randn(1, ids.shape[1], embedding.base_layer.embedding_dim)

    def run():
        rows.grad = None
        with Shapes() as shapes:
            out = embedding(ids)
            (out * weights).sum().backward()
        return out.detach(), rows.grad.clone(), shapes.made

    beside = run()
    del embedding.forward  # PEFT's
    copied = run()
    whole = tuple(embedding.base_layer.weight.shape)
    assert whole not in beside[2] and whole in copied[2]
    torch.testing.assert_close(beside[0], copied[0])
    torch.testing.assert_close(beside[1], copied[1])
    assert beside[1].abs().sum() > 0


@pytest.mark.parametrize("kind, shape", [("gemma2", {"head_dim": 16}), ("granite", {"logits_scaling": 8.0})])
def test_a_model_that_changes_its_heads_output_keeps_its_own_forward(kind, shape, tmp_path):
    """Gemma 2 caps its logits at 30 (30 tanh(x / 30)), Granite divides them by
    logits_scaling: the chunked head computes neither, so such a model trains with its own
    forward and its loss is its own (with logits up to about 60 here, where the cap shows)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from ft_ray.models import load_tokenizer
    from ft_ray.train.fast_paths import has_chunked_head

    shape = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
             "num_key_value_heads": 2, "vocab_size": 800, "pad_token_id": 0, **shape}
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(kind, **shape))
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(300)
    model.save_pretrained(tmp_path / kind)
    load_tokenizer(ModelConfig()).save_pretrained(tmp_path / kind)
    config = config_from_dict({"method": "lora", "model": {"name_or_path": str(tmp_path / kind),
                                                           "attn_implementation": "eager"},
                               "data": {"train": "t.jsonl"}, "lora": {"dropout": 0.0}})
    trained = build_model(config, str(tmp_path / kind)).eval()
    assert not has_chunked_head(trained)
    ids = torch.randint(3, 800, (1, 24))
    with torch.no_grad():
        logits = model.eval()(ids).logits
        assert logits.abs().max() > 20
        assert trained(input_ids=ids, labels=ids).loss.item() == pytest.approx(model(ids, labels=ids).loss.item(), rel=1e-5)


def test_neftune_noise_scales_by_each_packed_examples_length_and_stops_in_eval():
    """`train.neftune_alpha`: uniform noise of at most alpha/sqrt(L * d) on the input
    embeddings of an example of L tokens (each example of a packed row its own L)."""
    from ft_ray.train.modeling import example_lengths

    positions = batch()["position_ids"]
    assert example_lengths(positions).tolist() == [[40] * 40 + [24] * 24, [64] * 64]
    model = build_model(job(neftune_alpha=5.0), "builtin:tiny-llama")
    seen = []
    model.get_input_embeddings().register_forward_hook(lambda m, args, out: seen.append(out.detach()))
    inputs = batch()
    clean = model.get_input_embeddings().weight[inputs["input_ids"]].detach()
    model.train()
    model(**inputs, use_cache=False)
    noise = seen[-1] - clean
    dims = clean.shape[-1]
    for row, spans in ((0, [(0, 40), (40, 64)]), (1, [(0, 64)])):
        for start, end in spans:
            bound = 5.0 / (end - start) ** 0.5 / dims ** 0.5
            largest = noise[row, start:end].abs().max().item()
            assert 0.95 * bound < largest <= bound * 1.0001
    model.eval()
    model(**inputs, use_cache=False)
    assert torch.equal(seen[-1], clean)
