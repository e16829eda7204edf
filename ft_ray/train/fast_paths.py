"""Less memory traffic and activation memory per step: LoRA layers' forward in one GEMM
epilogue, the residual stream in the compute dtype, the MLP's SwiGLU product recomputed.

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

import sys
import types
from typing import Any

import torch

from ft_ray.data.tokenize import IGNORE_INDEX
from ft_ray.models import causal_lm


def fused_forward(self: Any, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    active = [a for a in self.active_adapters if a in self.lora_A]
    if args or kwargs or self.disable_adapters or self.merged or len(active) != 1 or active[0] in self.lora_variant:
        return type(self).forward(self, x, *args, **kwargs)
    name = active[0]
    rows = x.reshape(-1, x.shape[-1])
    result = self.base_layer(rows)  # 2-D: a tensor of its own, not a view (in-place on a view costs a copy in backward)
    dtype = result.dtype
    a_weight, b_weight = self.lora_A[name].weight, self.lora_B[name].weight
    down = torch.nn.functional.linear(self.lora_dropout[name](rows).to(dtype), a_weight.to(dtype)).to(dtype)
    update = (down, b_weight.to(dtype).t())
    if type(self.base_layer) is torch.nn.Linear:  # its backward does not need its output: add in place
        result = result.addmm_(*update, alpha=self.scaling[name])
    else:  # quantized base layers (bitsandbytes' subclass nn.Linear): a new tensor, as PEFT clones their output
        result = torch.addmm(result, *update, alpha=self.scaling[name])
    return result.view(*x.shape[:-1], result.shape[-1])


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
    norm gets it back in its weight's dtype, so the loss head sees what it saw before. Each
    decoder layer's output is cast too: a mixture of experts' fused expert weights run in
    fp32 (autocast leaves grouped matmuls alone), and their fp32 output added to the stream
    made it fp32 again from the first expert layer on.
    Returns whether the model has the (embeddings, decoder with a final `norm`) it needs.
    """
    embeddings = model.get_input_embeddings()
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    norm = getattr(decoder, "norm", None)
    if embeddings is None or not isinstance(norm, torch.nn.Module):
        return False

    def to_compute(module: Any, args: Any, output: Any) -> Any:
        if isinstance(output, tuple):  # a decoder layer's (hidden states, ...) in some models
            return (to_compute(module, args, output[0]), *output[1:])
        if not output.is_floating_point() or not torch.is_autocast_enabled(output.device.type):
            return output  # outside autocast the fp32 layers need fp32 inputs
        return output.to(dtype)

    def to_norm_dtype(module: Any, args: tuple) -> tuple:
        weight = getattr(module, "weight", None)
        if weight is None or not args or args[0].dtype == weight.dtype:
            return args
        return (args[0].to(weight.dtype), *args[1:])

    embeddings.register_forward_hook(to_compute)
    for layer in getattr(decoder, "layers", None) or ():
        layer.register_forward_hook(to_compute)
    norm.register_forward_pre_hook(to_norm_dtype)
    return True


class _RecomputedProductDown(torch.autograd.Function):
    """down_proj(product(gate, up)) that keeps gate and up for backward but not the product
    (as large as each of them): backward recomputes it, one elementwise pass."""

    @staticmethod
    def forward(ctx: Any, gate: torch.Tensor, up: torch.Tensor, weight: torch.Tensor, product: Any) -> torch.Tensor:
        with torch.no_grad():
            inner = product(gate, up)
        ctx.product = product
        ctx.save_for_backward(gate, up, weight)
        return torch.nn.functional.linear(inner, weight.to(inner.dtype))

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple:
        gate, up, weight = ctx.saved_tensors
        with torch.enable_grad():
            gate_, up_ = gate.detach().requires_grad_(), up.detach().requires_grad_()
            inner = ctx.product(gate_, up_)
        rows = grad.reshape(-1, grad.shape[-1])
        grad_weight = rows.t() @ inner.detach().reshape(-1, inner.shape[-1]).to(rows.dtype)
        grad_inner = grad @ weight.to(grad.dtype)
        # last: liger's backward writes the gradients over gate and up
        grad_gate, grad_up = torch.autograd.grad(inner, (gate_, up_), grad_inner.to(inner.dtype))
        return grad_gate, grad_up, grad_weight.to(weight.dtype), None


def recompute_swiglu_product(model: Any) -> int:
    """Every gated MLP (gate_proj, up_proj, down_proj without bias, act_fn) of `model` stops
    saving act(gate) * up for down_proj's weight gradient; it is recomputed in backward
    (liger-kernel's fused SwiGLU where liger patched the MLP, else act_fn(gate) * up).
    For trained down_proj weights (full fine-tunes): a frozen one never saves it. Returns how many."""
    count = 0
    for module in model.modules():
        down = getattr(module, "down_proj", None)
        if not (type(down) is torch.nn.Linear and down.bias is None and all(
                isinstance(getattr(module, name, None), torch.nn.Module) for name in ("gate_proj", "up_proj", "act_fn"))):
            continue
        product = _liger_product(module) or (lambda gate, up, act=module.act_fn: act(gate) * up)
        module.forward = types.MethodType(_gated_mlp_forward(product), module)
        count += 1
    return count


def liger_patched(module: Any) -> bool:
    """Whether liger-kernel replaced this module (its class) or bound its own forward to it
    (how it patches RMSNorm, MLP and the model's loss)."""
    forward = getattr(module.forward, "__func__", module.forward)
    return getattr(forward, "__module__", "").startswith("liger_kernel") or type(module).__module__.startswith(
        "liger_kernel")


def _liger_product(module: Any) -> Any:
    """liger's fused SiLU(gate) * up where liger patched this MLP, else None."""
    if not liger_patched(module):
        return None
    from liger_kernel.transformers.functional import liger_swiglu

    return liger_swiglu


def _gated_mlp_forward(product: Any) -> Any:
    def forward(self: Any, x: torch.Tensor) -> torch.Tensor:
        return _RecomputedProductDown.apply(self.gate_proj(x), self.up_proj(x), self.down_proj.weight, product)

    return forward


# ---------------------------------------------------------------- the LM head's loss in chunks

LOGITS_CHUNK_BYTES = 256 * 2 ** 20  # fp32 logits of one chunk of rows (smaller chunks make slower GEMMs on a CPU)


class _LinearCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of `hidden @ weight.T` against `targets` (`IGNORE_INDEX` ignored), taken
    over chunks of rows so that only one chunk's fp32 logits exist at a time: its loss and its
    gradients (softmax minus one-hot, over the number of targets) are taken in forward, as
    liger-kernel's fused linear + cross-entropy does on CUDA; backward scales them. The same
    FLOPs as the plain head and loss, without the [tokens, vocabulary] logits. With `rows`, the
    head's rows `index` are `rows` instead (PEFT's trainable tokens: `head_parts`), trained
    without a copy of the head or its whole gradient; `grads`: (hidden, weight, rows)."""

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, rows: torch.Tensor | None,
                index: torch.Tensor | None, targets: torch.Tensor, chunk: int, grads: tuple[bool, bool, bool]
                ) -> torch.Tensor:
        count = (targets != IGNORE_INDEX).sum().clamp(min=1)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if grads[0] else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if grads[1] else None
        grad_rows = torch.zeros(rows.shape, dtype=torch.float32, device=rows.device) if grads[2] else None
        for start in range(0, hidden.shape[0], chunk):
            h, y = hidden[start:start + chunk], targets[start:start + chunk]
            logits = (h @ weight.t()).float()  # the plain head's matmul (autocast's dtype), upcast as HF's loss does
            if rows is not None:
                logits[:, index] = (h @ rows.t()).float()
            valid = y != IGNORE_INDEX
            picked = y.clamp(min=0)
            norm = torch.logsumexp(logits, dim=-1)
            total += ((norm - logits.gather(1, picked[:, None])[:, 0]) * valid).sum()
            if any(grads):
                grad = _softmax_minus_one_hot(logits, y, h.dtype)
                del logits
                scale = (valid / count).to(h.dtype)[:, None]  # per row: applied to the smaller side of each product
                if grads[0]:
                    grad_hidden[start:start + chunk] = _input_slope(grad, weight, rows, index) * scale
                if grads[1]:
                    grad_weight += (grad.t() @ (h * scale)).float()
                if grads[2]:
                    grad_rows += (grad[:, index].t() @ (h * scale)).float()
        ctx.save_for_backward(grad_hidden, grad_weight, grad_rows)
        return total / count

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple:
        grad_hidden, grad_weight, grad_rows = ctx.saved_tensors
        return (grad_hidden * grad.to(grad_hidden.dtype) if grad_hidden is not None else None,
                grad_weight * grad if grad_weight is not None else None,
                grad_rows * grad if grad_rows is not None else None, None, None, None, None)


class _LinearTokenLogps(torch.autograd.Function):
    """Each row's log-prob of its target under `hidden @ weight.T` (0 where the target is
    `IGNORE_INDEX`), chunk by chunk as `_LinearCrossEntropy` (`rows`, `index`, `grads` as there).
    How much each row's log-prob counts is known only in backward (the preference losses weigh
    answers unequally): with a frozen head (LoRA, QLoRA) forward keeps d logp / d hidden per row
    ([tokens, hidden]), and backward scales it; a trained head's gradient (or its trained rows')
    is a sum over rows of [vocabulary, hidden] products, so backward takes each chunk's logits
    again (one more head matmul)."""

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, rows: torch.Tensor | None,
                index: torch.Tensor | None, targets: torch.Tensor, chunk: int, grads: tuple[bool, bool, bool]
                ) -> torch.Tensor:
        device = hidden.device.type
        ctx.dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype
        ctx.chunk, ctx.grads, ctx.index = chunk, grads, index
        logps = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        slopes = torch.empty_like(hidden, dtype=ctx.dtype) if grads == (True, False, False) else None
        with torch.autocast(device, enabled=False):
            for start in range(0, hidden.shape[0], chunk):
                logits = _chunk_logits(hidden[start:start + chunk], weight, rows, index, ctx.dtype)
                y = targets[start:start + chunk]
                picked = logits.gather(1, y.clamp(min=0)[:, None])[:, 0]
                logps[start:start + chunk] = (picked - torch.logsumexp(logits, dim=-1)) * (y != IGNORE_INDEX)
                if slopes is not None:  # d logp / d hidden: minus the loss's slope, 0 where no target
                    scale = -(y != IGNORE_INDEX).to(ctx.dtype)[:, None]
                    slopes[start:start + chunk] = _input_slope(_softmax_minus_one_hot(logits, y, ctx.dtype), weight,
                                                               rows, index) * scale
        ctx.save_for_backward(*((slopes,) if slopes is not None else (hidden, weight, rows, targets)))
        return logps

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple:
        if ctx.grads == (True, False, False):
            (slopes,) = ctx.saved_tensors
            return slopes * grad[:, None].to(slopes.dtype), None, None, None, None, None, None
        hidden, weight, rows, targets = ctx.saved_tensors
        index = ctx.index
        grad_hidden = torch.empty_like(hidden) if ctx.grads[0] else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if ctx.grads[1] else None
        grad_rows = torch.zeros(rows.shape, dtype=torch.float32, device=rows.device) if ctx.grads[2] else None
        for start in range(0, hidden.shape[0], ctx.chunk):
            h, y = hidden[start:start + ctx.chunk], targets[start:start + ctx.chunk]
            slope = _softmax_minus_one_hot(_chunk_logits(h, weight, rows, index, ctx.dtype), y, ctx.dtype)
            # per row: how much its log-prob counts, 0 where no target, on the smaller side of each product
            scale = (-(y != IGNORE_INDEX).float() * grad[start:start + ctx.chunk].float()).to(ctx.dtype)[:, None]
            if grad_hidden is not None:
                grad_hidden[start:start + ctx.chunk] = _input_slope(slope, weight, rows, index) * scale
            if grad_weight is not None:
                grad_weight += (slope.t() @ (h.to(ctx.dtype) * scale)).float()
            if grad_rows is not None:
                grad_rows += (slope[:, index].t() @ (h.to(ctx.dtype) * scale)).float()
        return grad_hidden, grad_weight, grad_rows, None, None, None, None


class _LinearRowLoss(torch.autograd.Function):
    """A loss summed over rows from each row's fp32 logits `hidden @ weight.T`: `loss_of(start,
    logits)` gives the loss of the chunk of rows from `start` (a tensor, differentiable in
    `logits`). Taken chunk by chunk as `_LinearCrossEntropy`: each chunk's logits, its loss and
    their slope (by autograd on the chunk alone) in forward, then dropped; backward scales the
    gradients. For losses that need more than each row's target (a teacher's distribution:
    `ft_ray.train.distillation`). `rows`, `index`, `grads` as in `_LinearCrossEntropy`."""

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, rows: torch.Tensor | None,
                index: torch.Tensor | None, chunk: int, grads: tuple[bool, bool, bool], loss_of: Any) -> torch.Tensor:
        device = hidden.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if grads[0] else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if grads[1] else None
        grad_rows = torch.zeros(rows.shape, dtype=torch.float32, device=rows.device) if grads[2] else None
        with torch.autocast(device, enabled=False):
            for start in range(0, hidden.shape[0], chunk):
                h = hidden[start:start + chunk].to(dtype)
                logits = _chunk_logits(h, weight, rows, index, dtype)
                with torch.enable_grad():
                    logits.requires_grad_(any(grads))
                    loss = loss_of(start, logits)
                    slope = torch.autograd.grad(loss, logits)[0].to(dtype) if any(grads) else None
                total += loss.detach().float()
                del logits
                if grads[0]:
                    grad_hidden[start:start + chunk] = _input_slope(slope, weight, rows, index).to(hidden.dtype)
                if grads[1]:
                    grad_weight += (slope.t() @ h).float()
                if grads[2]:
                    grad_rows += (slope[:, index].t() @ h).float()
        ctx.save_for_backward(grad_hidden, grad_weight, grad_rows)
        return total

    backward = staticmethod(_LinearCrossEntropy.backward)  # the gradients taken in forward, scaled


def _softmax_minus_one_hot(logits: torch.Tensor, targets: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Each row's d(-logp(target)) / d logits (fp32 `logits`), in `dtype`: the softmax minus
    the target's one-hot (rows of `IGNORE_INDEX`: any value, their callers scale them by 0)."""
    slope = torch.softmax(logits, dim=-1)
    slope[torch.arange(len(targets), device=targets.device), targets.clamp(min=0)] -= 1
    return slope.to(dtype)


def _chunk_logits(h: torch.Tensor, weight: torch.Tensor, rows: torch.Tensor | None, index: torch.Tensor | None,
                  dtype: torch.dtype) -> torch.Tensor:
    """A chunk's fp32 logits from a matmul in `dtype` (what autocast gave the forward), the
    columns `index` from `rows` where there are any."""
    logits = (h.to(dtype) @ weight.to(dtype).t()).float()
    if rows is not None:
        logits[:, index] = (h.to(dtype) @ rows.to(dtype).t()).float()
    return logits


def _input_slope(slope: torch.Tensor, weight: torch.Tensor, rows: torch.Tensor | None,
                 index: torch.Tensor | None) -> torch.Tensor:
    """`slope @ head`, the head's rows `index` being `rows` where there are any."""
    product = slope @ weight.to(slope.dtype)
    if rows is not None:
        product += slope[:, index] @ (rows.to(slope.dtype) - weight[index].to(slope.dtype))
    return product


def head_parts(head: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """The output layer's weight, and the rows PEFT's trainable tokens put in place of its rows
    `index` (`model.untrained_tokens`) while that adapter is on: (weight, rows, index), or
    (weight, None, None). Asking the wrapper for its `weight` instead would copy the whole head
    each step, train through the copy's whole gradient, and keep the rows with the adapter
    switched off (a preference reference)."""
    layer = getattr(head, "token_adapter", None)
    if layer is None:
        return head.weight, None, None
    active = list(layer.active_adapters)
    if layer.merged or layer.disable_adapters or not active:
        return layer.base_layer.weight, None, None
    if len(active) > 1 or active[0] not in layer.token_indices:
        return head.weight, None, None  # PEFT's own merge of several adapters' rows
    weight = layer.base_layer.weight
    index = torch.as_tensor(layer.token_indices[active[0]], device=weight.device)
    return weight, layer.trainable_tokens_delta[active[0]], index


def embedding_rows_beside(model: Any) -> int:
    """PEFT's trainable tokens on an input embedding (`model.untrained_tokens`, `add_tokens`
    with `new_tokens: rows`) look their rows up beside the frozen embedding: PEFT's forward
    copies the whole embedding with the rows written in each step (1 GiB at Llama 3 8B's
    128k x 4096 in bf16) and back-propagates a gradient of that whole copy to reach the rows.
    The same outputs and row gradients; returns the layers changed."""
    from peft.tuners.trainable_tokens.layer import TrainableTokensLayer

    changed = 0
    for module in model.modules():
        if isinstance(module, TrainableTokensLayer) and isinstance(module.base_layer, torch.nn.Embedding):
            module.forward = types.MethodType(_rows_beside_forward, module)
            changed += 1
    return changed


def _rows_beside_forward(self: Any, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    active = list(self.active_adapters)
    if self.disable_adapters or self.merged or len(active) != 1 or active[0] not in self.token_indices:
        return type(self).forward(self, x, *args, **kwargs)  # PEFT's own: off, merged, several adapters
    rows = self.trainable_tokens_delta[active[0]]
    out = self.base_layer(x, *args, **kwargs)  # a scaled embedding (Gemma's) scales in its own forward
    slot = torch.full((self.base_layer.num_embeddings,), -1, dtype=torch.long, device=x.device)
    slot[torch.as_tensor(self.token_indices[active[0]], device=x.device)] = torch.arange(len(rows), device=x.device)
    slot = slot[x]
    picked = torch.nn.functional.embedding(slot.clamp(min=0), rows)
    scale = self._get_embed_scale()
    if scale is not None:
        picked = picked * scale.to(picked.dtype)
    return torch.where((slot >= 0).unsqueeze(-1), picked.to(out.dtype), out)


def chunked_lm_head(model: Any, sft_loss: bool = True, plain_logits: bool | None = None) -> bool:
    """Give a causal LM (`*ForCausalLM`: a decoder under `base_model_prefix` and a bias-free
    linear head) a forward whose head works in chunks of rows, never holding the [tokens,
    vocabulary] logits: given `token_logps_of=labels` it returns {"token_logps": [B, L]} (each
    token's log-prob, as `preference.token_logps`; `_LinearTokenLogps`), and with `sft_loss`,
    given labels, the next-token loss (`_LinearCrossEntropy`: what liger's fused linear +
    cross-entropy is on CUDA, in plain torch, for a CPU or a GPU without liger); given
    `row_loss_of=(labels, loss_of)`, {"loss": the sum of `loss_of(start, logits)` over the
    chunks of the rows whose next token is a target (`_LinearRowLoss`; in row-major order, as
    `labels[:, 1:] != IGNORE_INDEX` picks them). Otherwise (generation, liger's loss) the
    model's own forward runs. Not for ZeRO-3 (the head's
    weight is gathered only inside its own forward), nor for a model whose forward changes the
    head's output (`logits_are_the_heads`; `plain_logits` when already known: a model built
    empty cannot run to tell). Returns whether it applied."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    decoder = getattr(model, getattr(model, "base_model_prefix", ""), None)
    if type(head) is not torch.nn.Linear or head.bias is not None or not isinstance(decoder, torch.nn.Module):
        return False
    if not (plain_logits if plain_logits is not None else logits_are_the_heads(model, head)):
        return False
    from transformers.modeling_outputs import CausalLMOutputWithPast

    plain = model.forward

    def forward(self: Any, input_ids: Any = None, labels: Any = None, token_logps_of: Any = None,
                row_loss_of: Any = None, **kwargs: Any) -> Any:
        scored = next((t for t in (token_logps_of, row_loss_of and row_loss_of[0], labels if sft_loss else None)
                       if t is not None), None)
        if scored is None or kwargs.get("inputs_embeds") is not None:
            return plain(input_ids=input_ids, labels=labels, **kwargs)
        for key in ("num_items_in_batch", "logits_to_keep", "return_dict"):
            kwargs.pop(key, None)
        decoded = decoder(input_ids=input_ids, **kwargs)
        hidden = decoded.last_hidden_state.reshape(-1, decoded.last_hidden_state.shape[-1])
        targets = torch.nn.functional.pad(scored, (0, 1), value=IGNORE_INDEX)[:, 1:].reshape(-1)  # HF's shift
        # asked each time, not `head`: PEFT puts a trained copy of the head in its place (new tokens),
        # or its trainable tokens around it
        weight, rows, index = head_parts(self.get_output_embeddings())
        chunk = max(1, LOGITS_CHUNK_BYTES // (4 * weight.shape[0]))
        grads = tuple(torch.is_grad_enabled() and t is not None and t.requires_grad for t in (hidden, weight, rows))
        if row_loss_of is not None:
            keep = targets != IGNORE_INDEX
            return {"loss": _LinearRowLoss.apply(hidden[keep], weight, rows, index, chunk, grads, row_loss_of[1])}
        if token_logps_of is not None:  # row t scored token t + 1: token t's log-prob is row t - 1's
            logps = _LinearTokenLogps.apply(hidden, weight, rows, index, targets, chunk, grads).view(scored.shape)
            return {"token_logps": torch.nn.functional.pad(logps[:, :-1], (1, 0))}
        loss = _LinearCrossEntropy.apply(hidden, weight, rows, index, targets, chunk, grads)
        if kwargs.get("output_router_logits"):  # a mixture of experts' load-balancing loss, as its own forward adds
            loss = loss + router_aux_loss(self, decoded.router_logits)
        return CausalLMOutputWithPast(loss=loss)

    forward.chunked_head = True  # read by has_chunked_head (through the bound method)
    model.forward = types.MethodType(forward, model)
    return True


def router_aux_loss(model: Any, router_logits: Any) -> torch.Tensor:
    """A mixture of experts' load-balancing loss at its weight, as its own forward computes it
    (the `load_balancing_loss_func` of its modeling module, that of the class FSDP's subclass
    of it was made from; no attention mask: packed rows)."""
    modules = (sys.modules.get(cls.__module__) for cls in type(model).__mro__)
    balance = next(m.load_balancing_loss_func for m in modules if hasattr(m, "load_balancing_loss_func"))
    return model.router_aux_loss_coef * balance(router_logits, model.num_experts, model.num_experts_per_tok, None)


def head_gives_logits(model: Any) -> bool:
    """`logits_are_the_heads` of the model's output layer; False without a linear one."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return type(head) is torch.nn.Linear and logits_are_the_heads(model, head)


def logits_are_the_heads(model: Any, head: torch.nn.Module) -> bool:
    """Whether the model's forward returns its output layer's output as the logits, unchanged:
    not Gemma 2's soft cap, Granite's `logits_scaling` or Cohere's `logit_scale`, which the
    chunked head would leave out. Two tokens run with the head's output replaced by values
    from -64 to 64 (a cap or scale changes them, whatever the model's own logits are)."""
    given = {}

    def replace(module: Any, inputs: Any, output: torch.Tensor) -> torch.Tensor:
        ramp = torch.linspace(-64, 64, output.numel(), device=output.device)
        given["logits"] = ramp.reshape(output.shape).to(output.dtype)
        return given["logits"]

    device = next(model.parameters()).device
    handle = head.register_forward_hook(replace)
    try:
        with torch.no_grad():
            logits = model(input_ids=torch.zeros(1, 2, dtype=torch.long, device=device), use_cache=False).logits
    finally:
        handle.remove()
    return torch.equal(logits.to(given["logits"].dtype), given["logits"])


def has_chunked_head(model: Any) -> bool:
    """Whether a causal LM (or the one inside a PEFT model) has `chunked_lm_head`'s forward."""
    return getattr(causal_lm(model).forward, "chunked_head", False)
