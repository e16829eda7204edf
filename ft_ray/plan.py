"""`ft-ray plan`: will a job fit its GPUs, before anything is launched.

From the model's `config.json` alone (no weights loaded, no GPU needed), the memory one
training worker holds at its peak, part by part: the weights in the dtype each method keeps
them in, the trained parameters' gradients and AdamW states (sharded by the ZeRO stage,
offloaded), the activations of a micro batch for the project's own settings, the logits and
loss, and a stated allowance for the CUDA context and the allocator. When a job does not fit,
the cheapest changes that would make it fit, each with its new peak.

The activation count lists what a decoder layer saves for backward (per token: the norms'
inputs and outputs, q/k/v and the attention output, the MLP's gate and up and their
product; in a mixture of experts those of each expert a token goes to, and the router's
output) and multiplies it by `ACTIVATION_MARGIN` for what the list leaves out. The model is
the one of decoder-only transformers (Llama, Mistral, Qwen and their like), dense or a
mixture of experts (Mixtral, Qwen-MoE, OLMoE, GLM-4.5), with grouped-query attention or
DeepSeek's latent attention (DeepSeek-V2 and V3, GLM-4.7-Flash).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from ft_ray.config import DistributedConfig, InputError, JobConfig, edge_values, with_overrides
from ft_ray.models import EXPERT_ALIASES, MLP_NAMES

MIB = 2 ** 20
# Saved tensors the per-layer list leaves out (views autograd makes contiguous, kernels' own
# buffers) and the allocator's rounding: measured 71.2 kB per token per layer against 59.5 kB
# listed for the 1B Llama shape's full fine-tune on an H100 (bench/RESULTS.md, session 9).
ACTIVATION_MARGIN = 1.2
CUDA_CONTEXT_MIB = 600  # the CUDA context, cuBLAS workspaces and NCCL buffers: outside torch's allocator
ALLOCATOR_SLACK = 0.05  # cached blocks the allocator holds beyond what tensors use
QLORA_BYTES = {True: 0.5 + 1 / 64 + 4 / (64 * 256), False: 0.5 + 4 / 64}  # NF4 + absmax (double quant or not)
# model types whose attention normalizes q and k (an RMSNorm per head, or over the projection), beside
# configs that say `use_qk_norm`
QK_NORM_TYPES = ("qwen3", "qwen3_moe", "qwen3_next", "olmo2", "olmo3", "gemma3", "gemma3_text")
QK_NORM_OVER_PROJECTIONS = ("olmo2", "olmo3")  # q's and k's norms span all heads (the others': one head's features)
# model types with DeepSeek's latent attention as `Shape.linears` has it (others with a `kv_lora_rank` add an
# indexer of sparse attention, or lay it out otherwise: refused)
LATENT_ATTENTION_TYPES = ("deepseek_v2", "deepseek_v3", "glm4_moe_lite")


@dataclasses.dataclass(frozen=True)
class Shape:
    """What memory depends on in a decoder's config. A mixture of experts (`experts` > 0)
    routes a token to `experts_per_token` of a layer's experts (fused 3-D weights,
    `expert_intermediate` wide) beside an optional shared expert (`shared_intermediate`:
    Qwen2-MoE's, with a gate, or GLM-4.5's `n_shared_experts`); its first or some
    `dense_layers` have a dense MLP `intermediate` wide instead (GLM-4.5's
    first_k_dense_replace, Qwen-MoE's mlp_only_layers), else `intermediate` is 0. `kinds`
    splits such a model into its two uniform parts. `mlp_names_to_experts`: PEFT takes the
    MLP layers' names for the fused experts (`models.peft_takes_mlp_names`), so linear
    layers of those names get no adapter. `qk_norm`: the attention normalizes q and k
    (Qwen3's, OLMo 2's, Gemma 3's: `QK_NORM_TYPES`). `kv_rank` > 0: DeepSeek's latent
    attention, k and v for all heads from a latent of `kv_rank` features (and one key head of
    `rope_dim` positional features), q from one of `q_rank` (0: straight from the hidden
    states); `head_dim` is q's and k's (positional features included), `v_head_dim` v's.
    `attention_norms`: the weights of the attention's own norms in a layer (q's and k's, the
    latents')."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    scaled_logits: bool = False  # the forward caps or scales the head's output: no chunked head (fast_paths)
    experts: int = 0
    experts_per_token: int = 0
    expert_intermediate: int = 0
    shared_intermediate: int = 0
    dense_layers: int = 0
    shared_expert_gate: bool = False
    mlp_names_to_experts: bool = False
    qk_norm: bool = False
    q_rank: int = 0
    kv_rank: int = 0
    rope_dim: int = 0
    v_head_dim: int = 0
    attention_norms: int = 0

    @classmethod
    def of(cls, config: Any) -> "Shape":
        missing = [k for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                               "vocab_size") if not isinstance(getattr(config, k, None), int)]
        experts = (getattr(config, "num_local_experts", None) or getattr(config, "num_experts", None)
                   or getattr(config, "n_routed_experts", None) or 0)
        kind = getattr(config, "model_type", None)
        latent = getattr(config, "kv_lora_rank", None) or 0
        unknown = ("lacks " + ", ".join(missing) if missing else
                   f"has latent attention (kv_lora_rank) of a kind it does not know ({kind})"
                   if latent and kind not in LATENT_ATTENTION_TYPES else None)
        if unknown:
            raise InputError(f"ft-ray plan knows decoder-only models, dense (Llama, Mistral, Qwen...) or mixtures of "
                             f"experts (Mixtral, Qwen-MoE, GLM-4.5, DeepSeek-V3...); this config "
                             f"({type(config).__name__}) {unknown}")
        heads = config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        qk_norm = kind in QK_NORM_TYPES or bool(getattr(config, "use_qk_norm", False))
        attention: dict[str, Any] = {
            "qk_norm": qk_norm, "attention_norms": 0 if not qk_norm else
            (heads + kv_heads) * head_dim if kind in QK_NORM_OVER_PROJECTIONS else 2 * head_dim}
        if latent:  # every head's k and v from the latent; config.head_dim is the positional features' alone
            q_rank, rope = getattr(config, "q_lora_rank", None) or 0, config.qk_rope_head_dim
            kv_heads, head_dim = heads, config.qk_nope_head_dim + rope
            attention = {"q_rank": q_rank, "kv_rank": latent, "rope_dim": rope, "v_head_dim": config.v_head_dim,
                         "attention_norms": q_rank + latent}
        moe: dict[str, Any] = {}
        if experts:
            from ft_ray.models import peft_takes_mlp_names

            dense = dense_layer_count(config)
            expert_width = getattr(config, "moe_intermediate_size", None) or config.intermediate_size
            gated = getattr(config, "shared_expert_intermediate_size", None) or 0  # Qwen2-MoE's, gated
            moe = {"experts": experts, "experts_per_token": config.num_experts_per_tok,
                   "expert_intermediate": expert_width, "dense_layers": dense, "shared_expert_gate": bool(gated),
                   "mlp_names_to_experts": peft_takes_mlp_names(config),
                   "shared_intermediate": gated or (getattr(config, "n_shared_experts", None) or 0) * expert_width}
        return cls(config.hidden_size, config.intermediate_size if not experts or moe["dense_layers"] else 0,
                   config.num_hidden_layers, heads, kv_heads, head_dim, config.vocab_size,
                   bool(getattr(config, "tie_word_embeddings", False)),
                   getattr(config, "final_logit_softcapping", None) is not None
                   or getattr(config, "logits_scaling", 1) != 1 or getattr(config, "logit_scale", 1) != 1,
                   **attention, **moe)

    @property
    def q_width(self) -> int:
        """q's features per token (all heads'), as k's under latent attention."""
        return self.heads * self.head_dim

    @property
    def k_width(self) -> int:
        return self.q_width if self.kv_rank else self.kv_heads * self.head_dim

    @property
    def v_width(self) -> int:
        return self.heads * self.v_head_dim if self.kv_rank else self.k_width

    @property
    def out_width(self) -> int:
        """The attention output's features per token (o_proj's input)."""
        return self.heads * self.v_head_dim if self.kv_rank else self.q_width

    @property
    def layer_norm_params(self) -> int:
        """The norms' weights of one decoder layer: the two around attention and the MLP, and the attention's own."""
        return 2 * self.hidden + self.attention_norms

    def kinds(self) -> list["Shape"]:
        """The decoder layers by kind, each kind a Shape whose `layers` counts them: a mixture
        of experts with `dense_layers` has two (the dense layers, the expert layers); any
        other model one, itself."""
        if not (self.experts and self.dense_layers):
            return [self]
        dense = dataclasses.replace(self, layers=self.dense_layers, experts=0, experts_per_token=0,
                                    expert_intermediate=0, shared_intermediate=0, dense_layers=0,
                                    shared_expert_gate=False)
        return [dense, dataclasses.replace(self, layers=self.layers - self.dense_layers, intermediate=0,
                                           dense_layers=0)]

    def linears(self) -> dict[str, tuple[int, int]]:
        """(in, out) features of each linear layer of one decoder layer (a mixture of experts'
        expert layer: attention and the shared expert, if any; `kinds` for its dense layers)."""
        q, h = self.q_width, self.hidden
        if self.kv_rank:  # q straight or through its latent; k's positional head and the latent of k and v
            attention = ({"q_a_proj": (h, self.q_rank), "q_b_proj": (self.q_rank, q)} if self.q_rank
                         else {"q_proj": (h, q)})
            attention.update({"kv_a_proj_with_mqa": (h, self.kv_rank + self.rope_dim),
                              "kv_b_proj": (self.kv_rank, q - self.heads * self.rope_dim + self.v_width),
                              "o_proj": (self.out_width, h)})
        else:
            attention = {"q_proj": (h, q), "k_proj": (h, self.k_width), "v_proj": (h, self.v_width),
                         "o_proj": (q, h)}
        i = self.shared_intermediate if self.experts else self.intermediate
        mlp = {"gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)} if i else {}
        return {**attention, **mlp, **({"shared_expert_gate": (h, 1)} if self.shared_expert_gate else {})}

    def expert_weights(self) -> dict[str, tuple[int, int]]:
        """(in, out) features of each fused expert weight of one layer, per expert: gate and up
        together, down (none for a dense model)."""
        if not self.experts:
            return {}
        h, i = self.hidden, self.expert_intermediate
        return {"gate_up_proj": (h, 2 * i), "down_proj": (i, h)}

    @property
    def layer_linear_params(self) -> int:
        return sum(a * b for a, b in self.linears().values())

    @property
    def linear_params(self) -> int:
        """The linear layers' weights of all decoder layers."""
        return sum(kind.layers * kind.layer_linear_params for kind in self.kinds())

    @property
    def expert_layers(self) -> int:
        return self.layers - self.dense_layers if self.experts else 0

    @property
    def all_expert_params(self) -> int:
        """The fused expert weights and routers of all expert layers."""
        return self.expert_layers * self.layer_expert_params

    @property
    def expert_params(self) -> int:
        """The weights of one expert of one layer."""
        return sum(a * b for a, b in self.expert_weights().values())

    @property
    def layer_expert_params(self) -> int:
        """The fused expert weights and the router of one layer (0 for a dense model)."""
        return self.experts * (self.expert_params + self.hidden)

    @property
    def mlp_width(self) -> int:
        """The MLP's intermediate features one token computes (its experts' and a shared
        expert's), the widest layer's of a model with dense and expert layers."""
        routed = self.experts_per_token * self.expert_intermediate + self.shared_intermediate if self.experts else 0
        return max(self.intermediate, routed)

    @property
    def token_layer_width(self) -> int:
        """The values one token's pass through a decoder layer holds at once with no gradients
        kept: its hidden states in and out, q, k, v (and latent attention's latents) and the
        attention output, the MLP's gate, up and their product."""
        attention = self.q_width + self.k_width + self.v_width + self.out_width + self.q_rank + self.kv_rank
        return 2 * self.hidden + attention + 3 * self.mlp_width

    @property
    def active_params(self) -> int:
        """The weights one token computes with: `params` less the experts it is not routed to."""
        return self.params - self.expert_layers * (self.experts - self.experts_per_token) * self.expert_params

    @property
    def embedding_params(self) -> int:
        return self.vocab * self.hidden

    @property
    def params(self) -> int:
        norms = self.layers * self.layer_norm_params + self.hidden
        return (self.linear_params + self.all_expert_params + norms + self.embedding_params
                + (0 if self.tied else self.embedding_params))


def dense_layer_count(config: Any) -> int:
    """How many decoder layers of a mixture of experts' config have a dense MLP instead:
    GLM-4.5's and DeepSeek's first `first_k_dense_replace`, Qwen-MoE's `mlp_only_layers` and
    those off its `decoder_sparse_step`, those `mlp_layer_types` calls dense (GLM-4.7-Flash)."""
    layers = config.num_hidden_layers
    kinds = getattr(config, "mlp_layer_types", None)
    if kinds:
        return sum(1 for kind in kinds[:layers] if kind == "dense")
    first = getattr(config, "first_k_dense_replace", None) or 0
    only, step = set(getattr(config, "mlp_only_layers", None) or ()), getattr(config, "decoder_sparse_step", None) or 1
    return sum(1 for i in range(layers) if i < first or i in only or (i + 1) % step)


# config.json shapes of well-known hub models, for when neither a folder nor the local cache
# has the file (hidden, intermediate, layers, heads, kv heads, head dim, vocab, tied embeddings)
KNOWN_SHAPES = {
    "meta-llama/Meta-Llama-3-8B": Shape(4096, 14336, 32, 32, 8, 128, 128256, False),
    "meta-llama/Meta-Llama-3-70B": Shape(8192, 28672, 80, 64, 8, 128, 128256, False),
    "meta-llama/Llama-3.2-1B": Shape(2048, 8192, 16, 32, 8, 64, 128256, True),
    "meta-llama/Llama-3.2-3B": Shape(3072, 8192, 28, 24, 8, 128, 128256, True),
    "mistralai/Mistral-7B-v0.1": Shape(4096, 14336, 32, 32, 8, 128, 32000, False),
    "Qwen/Qwen2.5-7B": Shape(3584, 18944, 28, 28, 4, 128, 152064, False),
    "mistralai/Mixtral-8x7B-v0.1": Shape(4096, 0, 32, 32, 8, 128, 32000, False, experts=8, experts_per_token=2,
                                         expert_intermediate=14336),
    "Qwen/Qwen3-30B-A3B": Shape(2048, 0, 48, 32, 4, 128, 151936, False, experts=128, experts_per_token=8,
                                expert_intermediate=768, qk_norm=True, attention_norms=256),
    "deepseek-ai/DeepSeek-V3": Shape(7168, 18432, 61, 128, 128, 192, 129280, False, experts=256, experts_per_token=8,
                                     expert_intermediate=2048, shared_intermediate=2048, dense_layers=3,
                                     mlp_names_to_experts=True, q_rank=1536, kv_rank=512, rope_dim=64, v_head_dim=128,
                                     attention_norms=2048),
}
KNOWN_SHAPES.update({"meta-llama/Meta-Llama-3-8B-Instruct": KNOWN_SHAPES["meta-llama/Meta-Llama-3-8B"],
                     "meta-llama/Llama-3.1-8B": KNOWN_SHAPES["meta-llama/Meta-Llama-3-8B"],
                     "meta-llama/Llama-3.1-8B-Instruct": KNOWN_SHAPES["meta-llama/Meta-Llama-3-8B"],
                     "meta-llama/Meta-Llama-3-70B-Instruct": KNOWN_SHAPES["meta-llama/Meta-Llama-3-70B"],
                     "meta-llama/Llama-3.1-70B": KNOWN_SHAPES["meta-llama/Meta-Llama-3-70B"],
                     "meta-llama/Llama-3.1-70B-Instruct": KNOWN_SHAPES["meta-llama/Meta-Llama-3-70B"],
                     "Qwen/Qwen2.5-7B-Instruct": KNOWN_SHAPES["Qwen/Qwen2.5-7B"],
                     "deepseek-ai/DeepSeek-V3-0324": KNOWN_SHAPES["deepseek-ai/DeepSeek-V3"]})


def model_shape(config: JobConfig, network: bool = True) -> tuple[Shape, str]:
    """The model's shape and where it came from: its config.json (built-in, a folder, or a
    hub id in the local cache), ft-ray's table of well-known models, or (with `network`) the hub."""
    from transformers import AutoConfig

    from ft_ray.models import from_model_source, local_model_config

    name = config.model.name_or_path
    try:
        return Shape.of(local_model_config(config.model)), "config.json"
    except OSError:
        if name in KNOWN_SHAPES:
            return KNOWN_SHAPES[name], "ft-ray's table of well-known models (no config.json here)"
        if not network:
            raise InputError(f"model.name_or_path: no config.json of {name} here (folder or local cache)") from None
    try:
        where = "the store" if name.startswith("s3://") else "the hub"
        return Shape.of(from_model_source(AutoConfig.from_pretrained, config.model)), f"config.json from {where}"
    except Exception as e:  # noqa: BLE001 - no such folder, no network and not cached: said as it is
        raise InputError(f"model.name_or_path: cannot read the config.json of {name}: {type(e).__name__}: "
                         f"{str(e)[:300]}") from None


@dataclasses.dataclass
class Plan:
    """One worker's peak memory, part by part (MiB)."""

    parts: dict[str, float]
    workers: int
    tokens_per_micro_batch: int
    offloaded_mib: float = 0.0  # what the worker keeps in CPU memory instead (DeepSpeed's and FSDP's offload)
    startup_mib: float = 0.0  # ZeRO-3 on a model not built partitioned: the whole model on the GPU as it starts

    @property
    def allocated_mib(self) -> float:
        """What tensors hold at the peak (torch.cuda.max_memory_allocated measures this)."""
        return sum(v for k, v in self.parts.items() if k not in ("allocator_slack", "cuda_context"))

    @property
    def peak_mib(self) -> float:
        return max(sum(self.parts.values()), self.startup_mib)

    def fits(self, gpu_mib: float) -> bool:
        return self.peak_mib <= gpu_mib


def trained_shape(config: JobConfig, shape: Shape) -> Shape:
    """The shape the job trains: a reward model's has a score head (one output per token)
    instead of the output layer, counted as a tied one (no weights of its own)."""
    return dataclasses.replace(shape, tied=True) if config.scores else shape


OTHER_SHAPES: dict[str, Shape] = {}  # reward models' and teachers', by name: read once per process (plan_memory loops)


def reward_model_shapes(config: JobConfig) -> list[Shape]:
    """The shapes of a GRPO job's reward models (`grpo.rewards` "model:..."), from their
    config.json (an ft-ray reward model adapter's: its base's, the LoRA folded in), each a
    sequence classifier: no output layer (`tied`: the embeddings counted once)."""
    if config.objective != "grpo":
        return []
    from ft_ray.evaluation.reward_model import REWARD_MODEL, adapter_config, base_of, model_source_of

    names = [name for name in config.grpo.rewards if name.startswith(REWARD_MODEL)]
    for name in names:
        if name not in OTHER_SHAPES:
            adapter = adapter_config(name, config.storage)
            source = model_source_of(name, config.storage) if adapter is None else base_of(adapter, config.storage)
            shape, _ = model_shape(config.model_copy(update={"model": source}))
            OTHER_SHAPES[name] = dataclasses.replace(shape, tied=True)
    return [OTHER_SHAPES[name] for name in names]


def teacher_shape(config: JobConfig, network: bool = True) -> Shape | None:
    """The shape of a distill job's teacher, as `model_shape` finds a model's; None for other
    objectives.

    Raises:
        InputError: no config.json of it (here, or with `network` on the hub or in the store)."""
    if config.objective != "distill":
        return None
    key = f"distill.teacher:{config.distill.teacher}"
    if key not in OTHER_SHAPES:
        try:
            OTHER_SHAPES[key], _ = model_shape(config.model_copy(update={"model": config.teacher}), network)
        except InputError as e:
            raise InputError(f"distill.teacher: {str(e).removeprefix('model.name_or_path: ')}") from None
    return OTHER_SHAPES[key]


def quantized_compute_bytes(config: JobConfig) -> int:
    """Bytes per value of QLoRA's `quantization.compute_dtype`."""
    return 4 if config.quantization.compute_dtype == "float32" else 2


def quantized_bytes(config: JobConfig, shape: Shape, frozen: bool = False) -> float:
    """A model's weights as QLoRA loads them: linear layers in 4 bits, a mixture of experts'
    fused expert weights in `quantization.compute_dtype`, the rest in fp32 (prepared for
    training; `frozen`: in the compute dtype too, a distillation teacher)."""
    base_bytes = quantized_compute_bytes(config)
    layer_linear, experts = shape.linear_params, shape.all_expert_params
    return (layer_linear * QLORA_BYTES[config.quantization.double_quant] + base_bytes * experts
            + (base_bytes if frozen else 4) * (shape.params - layer_linear - experts))


def teacher_bytes(config: JobConfig, teacher: Shape, tokens: int, compute: int, sharded: bool = False) -> float:
    """What a teacher's forward holds beside its weights (no gradients, so one layer's tensors
    at a time, as `scoring_bytes`): its last hidden states at the batch's tokens, kept for the
    loss, and the loss's fp32 tensors: the two models' logits and a few of their softmaxes over
    a chunk of rows (the student's head in chunks: `fast_paths.LOGITS_CHUNK_BYTES`), else over
    every token. `sharded` (by FSDP or ZeRO-3): its own forward's logits over every token (in
    the compute dtype, then those of the target tokens kept) and the layers gathered for it."""
    rows = tokens
    if config.uses_fast_paths and not teacher.scaled_logits and not sharded:
        from ft_ray.train.fast_paths import LOGITS_CHUNK_BYTES

        rows = min(tokens, max(1, LOGITS_CHUNK_BYTES // (4 * teacher.vocab)))
    held = tokens * (teacher.token_layer_width + teacher.hidden) * compute + rows * teacher.vocab * 4 * 6
    if sharded:
        held += tokens * teacher.vocab * compute + gathered_bytes(config, teacher, compute)
    return held


def teacher_parts(config: JobConfig, teacher: Shape, tokens: int, compute: int, sharded_over: int = 0
                  ) -> dict[str, float]:
    """A distillation teacher's weights, frozen (4-bit under qlora, else in the compute dtype),
    whole or a worker's share of them sharded over `sharded_over` workers (fsdp, ZeRO-3: even
    one, whose teacher runs its own forward), and its forward over `tokens` (bytes)."""
    weights = quantized_bytes(config, teacher, frozen=True) if config.method == "qlora" else compute * teacher.params
    return {"teacher_weights": weights / max(sharded_over, 1),
            "teacher_forward": teacher_bytes(config, teacher, tokens, compute, sharded=sharded_over > 0)}


def teacher_pass(config: JobConfig, network: bool = True) -> Plan | None:
    """distill.teacher_logits: precomputed: a model actor's peak memory (a GPU each on GPU
    jobs) while it runs the teacher over a micro batch, before training; None for other jobs.

    Raises:
        InputError: no config.json of the teacher (`teacher_shape`)."""
    if not config.precomputes_teacher:
        return None
    compute = 4 if config.train.precision == "fp32" else 2
    tokens = config.train.micro_batch_size * config.model.max_seq_len
    parts = {k: v / MIB for k, v in teacher_parts(config, teacher_shape(config, network), tokens, compute).items()}
    parts["allocator_slack"] = ALLOCATOR_SLACK * sum(parts.values())
    parts["cuda_context"] = CUDA_CONTEXT_MIB if config.distributed.use_gpu else 0
    return Plan(parts, 1, tokens)


def scoring_bytes(config: JobConfig, shape: Shape, compute: int) -> float:
    """What a reward model's scoring forward holds at once (no gradients, so one layer's
    tensors, `Shape.token_layer_width`) for a batch of `SCORE_BATCH` answers."""
    from ft_ray.evaluation.reward_model import SCORE_BATCH

    rows = min(SCORE_BATCH, config.train.micro_batch_size * config.grpo.num_generations)
    return rows * (config.model.max_seq_len + config.grpo.max_new_tokens) * shape.token_layer_width * compute


# bitsandbytes' 8-bit AdamW: two uint8 states per weight and a float32 scale per block of 256 of
# each (tensors under 4096 values keep fp32 states: norms, biases; not counted)
ADAMW_8BIT_BYTES = 2 + 2 * 4 / 256


def sharding_stage(dist: DistributedConfig) -> int:
    """The ZeRO stage a job's workers shard as: DeepSpeed's; 3 for fsdp (weights, gradients
    and AdamW states); 0 for ddp."""
    return {"deepspeed": dist.deepspeed.stage, "fsdp": 3}.get(dist.strategy, 0)


def plan_memory(config: JobConfig, shape: Shape) -> Plan:
    """One training worker's peak GPU memory for `config` on a model of `shape`."""
    shape = trained_shape(config, shape)
    train, dist, ds = config.train, config.distributed, config.distributed.deepspeed
    workers = dist.min_workers  # an elastic run's fewest workers shard the least: its peak
    deepspeed, fsdp = dist.strategy == "deepspeed", dist.strategy == "fsdp"
    stage = sharding_stage(dist)
    shard = lambda stages: workers if stage >= stages else 1  # noqa: E731 - ZeRO partitions from this stage on
    compute = 4 if train.precision == "fp32" else 2
    layer_linear = shape.linear_params
    parts: dict[str, float] = {}

    if config.method == "full":
        trained = shape.params
        if deepspeed and compute == 2:  # DeepSpeed keeps 16-bit weights and fp32 master copies
            parts["weights"] = 2 * trained / shard(3)
            parts["master_weights"] = 0 if ds.offload_optimizer == "cpu" else 4 * trained / shard(1)
            parts["gradients"] = 2 * trained / shard(2)
        else:
            parts["weights"] = 4 * trained / shard(3)
            if compute == 2 and not fsdp:  # autocast's 16-bit copies of the matmul weights (the output layer's too), held for
                # backward; not of fused expert weights (their grouped matmul runs in fp32: `expert_bytes`)
                parts["weight_copies"] = 2 * (layer_linear + shape.embedding_params)
            parts["gradients"] = 4 * trained / shard(2)
        if ds.offload_params == "cpu":
            parts["weights"] = 0
    else:
        from ft_ray.models import trained_in_full

        saved_in_full = sum(shape.embedding_params for m in {*config.lora.modules_to_save, *trained_in_full(config.model)}
                            if m in ("lm_head", "embed_tokens"))  # in fp32, as every trained weight
        trained = adapter_params(config, shape) + saved_in_full
        base_bytes = compute
        if config.method == "qlora":
            base_bytes = quantized_compute_bytes(config)
            base = quantized_bytes(config, shape)
        else:
            base = compute * shape.params
        parts["base_weights"] = base / shard(3)  # ZeRO-3 partitions the frozen base too
        parts["lora_weights"] = 4 * trained / (workers if fsdp else 1)
        parts["gradients"] = 4 * trained / shard(2)
        if expert_ranks(config, shape):  # PEFT adds B @ A to each layer's expert weights: a copy held for backward
            held = 1 if train.gradient_checkpointing else shape.expert_layers
            parts["expert_weight_copies"] = base_bytes * held * shape.layer_expert_params
    if fsdp or (stage == 3 and config.objective == "grpo"):
        parts["gathered_weights"] = gathered_bytes(config, shape, compute)
    state_bytes = ADAMW_8BIT_BYTES if train.optimizer == "adamw_8bit" else 8
    parts["optimizer_states"] = 0 if ds.offload_optimizer == "cpu" else state_bytes * trained / shard(1)
    inline_reference = ((config.objective in ("dpo", "kto") and not config.precomputes_reference)
                        or (config.objective == "grpo" and config.grpo.beta > 0))
    if inline_reference and config.method == "full":
        # an inline reference (dpo/kto with preference.reference: inline, grpo with beta): a frozen copy of the
        # base, loaded in fp32 (preference.reference_model); ZeRO-3 and fsdp shard it in the engine's dtype
        parts["reference_weights"] = compute * shape.params / workers if stage == 3 else 4 * shape.params
    elif inline_reference and config.model.adapter:
        # the adapter it started from is not the adapter off: a frozen copy of the base with it, as it is held
        # (sharded by ZeRO-3 and fsdp)
        parts["reference_weights"] = (base + 4 * adapter_params(config, shape)) / shard(3)
    offloaded = 0.0
    if ds.offload_optimizer == "cpu":  # DeepSpeed's CPU AdamW: fp32 weights, gradients and states of its partition
        offloaded += (4 + 4 + state_bytes) * trained / shard(1)
    if ds.offload_params == "cpu":
        offloaded += compute * shape.params / shard(3)
    if fsdp and dist.fsdp.offload == "cpu":  # the shards, their gradients and AdamW's states in CPU memory
        moved = [part for part in ("weights", "base_weights", "lora_weights", "gradients", "optimizer_states",
                                   "reference_weights") if part in parts]
        offloaded += sum(parts[part] for part in moved)
        parts.update({part: 0 for part in moved})
    scorers = reward_model_shapes(config)
    if scorers:  # grpo.rewards "model:...": each worker loads each reward model whole (bf16 on a GPU, else fp32)
        parts["reward_models"] = (2 if dist.use_gpu else 4) * sum(scorer.params for scorer in scorers)

    # distill.teacher: whole on each worker, sharded under fsdp and ZeRO-3 (none when its logits are precomputed:
    # `teacher_pass`)
    teacher = None if config.precomputes_teacher else teacher_shape(config)

    tokens = train.micro_batch_size * config.model.max_seq_len
    if config.objective == "grpo":  # the loss forward: num_generations sampled answers per prompt, each after it
        tokens = train.micro_batch_size * config.grpo.num_generations * (config.model.max_seq_len
                                                                           + config.grpo.max_new_tokens)
    elif teacher and config.distill.on_policy:  # on-policy batches: a sampled answer after each prompt
        tokens = train.micro_batch_size * (config.model.max_seq_len + config.distill.max_new_tokens)
    if teacher:  # sharded as the student under fsdp and ZeRO-3 (`distillation.load_teacher`)
        parts.update(teacher_parts(config, teacher, tokens, compute, workers if config.sharded_weights else 0))
    parts["activations"] = activation_bytes(config, shape, compute) * tokens
    parts["logits_and_loss"] = logits_bytes(config, shape, tokens, compute)
    if scorers:  # scored before the loss forward, the answers sampled: where it holds more than training does
        scoring = max(scoring_bytes(config, scorer, 2 if dist.use_gpu else 4) for scorer in scorers)
        parts["reward_scoring"] = max(0.0, scoring - parts["activations"] - parts["logits_and_loss"])
    parts = {k: v / MIB for k, v in parts.items()}
    parts["allocator_slack"] = ALLOCATOR_SLACK * sum(parts.values())
    parts["cuda_context"] = CUDA_CONTEXT_MIB if dist.use_gpu else 0
    return Plan(parts, workers, tokens, offloaded / MIB, startup_mib(config, shape))


def startup_mib(config: JobConfig, shape: Shape) -> float:
    """A ZeRO-3 job on GPUs whose model is not built partitioned (`JobConfig.partitions_at_load`):
    DeepSpeed's engine moves the whole model to each GPU (in its 16-bit dtype but for fp32
    runs; QLoRA's 4-bit layers are there whole from their load) before it partitions it; 0 else."""
    if not (config.zero3 and config.distributed.use_gpu) or config.partitions_at_load:
        return 0.0
    compute = 4 if config.train.precision == "fp32" else 2
    whole = quantized_bytes(config, shape) if config.method == "qlora" else compute * shape.params
    return whole / MIB + CUDA_CONTEXT_MIB


def gathered_bytes(config: JobConfig, shape: Shape, compute: int) -> float:
    """The weights a worker holds gathered from the shards. FSDP: the outer ones (embeddings,
    output layer, final norm) all along; of the decoder layers the one running and the next
    one prefetched, or all of them from forward to backward without reshard_after_forward.
    FSDP and ZeRO-3 (not counted otherwise): every one while GRPO samples its answers
    (`grpo.whole_weights`). In the compute dtype (`fsdp_engine.shard_model`'s policy,
    DeepSpeed's 16-bit weights), but QLoRA's as stored: linear layers in 4 bits, experts in
    the compute dtype, the rest in fp32."""
    every = not config.distributed.fsdp.reshard_after_forward or config.objective == "grpo"
    outer = shape.embedding_params * (1 if shape.tied else 2) + shape.hidden
    qlora = config.method == "qlora"

    def layer(kind: Shape) -> float:  # one decoder layer and its two norms
        if qlora:
            return (kind.layer_linear_params * QLORA_BYTES[config.quantization.double_quant]
                    + quantized_compute_bytes(config) * kind.layer_expert_params + 4 * kind.layer_norm_params)
        return compute * (kind.layer_linear_params + kind.layer_expert_params + kind.layer_norm_params)

    layers = (sum(kind.layers * layer(kind) for kind in shape.kinds()) if every
              else min(2, shape.layers) * max(layer(kind) for kind in shape.kinds()))  # the largest two
    return (4 if qlora else compute) * outer + layers


def adapter_params(config: JobConfig, shape: Shape) -> int:
    """LoRA's A and B weights over every targeted linear layer and expert weight (rank
    `expert_ranks` per expert), and with all-linear the router (0 for a full fine-tune)."""
    if config.method == "full":
        return 0
    total = 0
    for kind in shape.kinds():
        linear = sum(config.lora.rank * (a + b) for a, b in adapted_linears(config, kind).values())
        experts = sum(rank * kind.experts * sum(kind.expert_weights()[name])
                      for name, rank in expert_ranks(config, kind).items())
        router = config.lora.rank * (kind.hidden + kind.experts) if experts and config.lora.target_modules == "all-linear" else 0
        total += (linear + experts + router) * kind.layers
    return total


# transformers 4's names of the fused expert weights, which PEFT maps onto them (Mixtral's, Qwen-MoE's)
def expert_ranks(config: JobConfig, shape: Shape) -> dict[str, int]:
    """LoRA's rank per expert on each fused expert weight the job targets (`models.peft_config`):
    by its name, by transformers 4's names (gate and up: PEFT doubles the rank of the fused
    weight, as two adapters were), or all-linear (as those)."""
    if config.method == "full" or not shape.experts:
        return {}
    targets, rank = config.lora.target_modules, config.lora.rank
    ranks = {}
    for name, aliases in EXPERT_ALIASES.items():
        if targets == "all-linear" or any(all(a in targets for a in names) for names in aliases):
            ranks[name] = rank * len(aliases[0])
        elif name in targets:
            ranks[name] = rank
    return ranks


def _targeted(module: str, targets: Any) -> bool:
    return targets == "all-linear" or module in targets


def adapted_linears(config: JobConfig, shape: Shape) -> dict[str, tuple[int, int]]:
    """The linear layers of one decoder layer (`Shape.linears`) LoRA adapts: those targeted,
    but not by names PEFT takes for the experts (`Shape.mlp_names_to_experts`)."""
    taken = MLP_NAMES if shape.mlp_names_to_experts else ()
    return {name: features for name, features in shape.linears().items()
            if _targeted(name, config.lora.target_modules) and name not in taken}


def expert_bytes(config: JobConfig, compute: int) -> int:
    """The bytes of a fused expert weight's matmul values: autocast leaves a grouped matmul
    alone, so it runs in the weights' dtype (fp32 in a full fine-tune but DeepSpeed's 16-bit one)."""
    if config.method == "full" and not (config.distributed.strategy in ("deepspeed", "fsdp") and compute == 2):
        return 4
    return compute


def fused(config: JobConfig) -> bool:
    """Whether the job runs liger-kernel's fused kernels (on GPUs, where the gpu extra installs them)."""
    return config.distributed.use_gpu and config.train.fused_kernels != "none"


def activation_bytes(config: JobConfig, shape: Shape, compute: int) -> float:
    """Bytes one token's activations hold through backward, over all layers."""
    residual = 4 if config.train.fp32_residual else compute
    layers = [(kind.layers, layer_activation_bytes(config, kind, compute)) for kind in shape.kinds()]
    if config.train.gradient_checkpointing:  # each layer's input kept; one layer (the largest) recomputed at a time
        return shape.layers * shape.hidden * residual + max(layer for _, layer in layers)
    return sum(count * layer for count, layer in layers)


def layer_activation_bytes(config: JobConfig, shape: Shape, compute: int) -> float:
    """Bytes one token's activations hold through backward in one decoder layer (of a shape
    whose layers are all alike: `Shape.kinds`)."""
    h = shape.hidden
    i = shape.shared_intermediate if shape.experts else shape.intermediate
    residual = 4 if config.train.fp32_residual else compute
    attention = (2 * h * residual + (shape.q_width + shape.k_width + shape.v_width + shape.out_width) * compute
                 + 4 * shape.heads)  # norm in/out, q k v, out, lse
    full = config.method == "full"
    if shape.qk_norm:  # q's and k's norms keep their fp32 input, and their output where their weights train
        attention += (shape.q_width + shape.k_width) * (4 + (compute if full else 0))
    if shape.kv_rank:
        # the kernel's v and output padded to q's width (`attention.packed_sdpa`), o_proj's input cut back; the
        # latents' norms keep their fp32 input, and their output where the layer after them trains
        adapted = adapted_linears(config, shape)
        attention += (2 * shape.q_width - shape.v_width) * compute + sum(
            width * (4 + (compute if full or following in adapted else 0))
            for width, following in ((shape.q_rank, "q_b_proj"), (shape.kv_rank, "kv_b_proj")))
    # gate and up; the product act(gate) * up unless recomputed (full fine-tunes, fast_paths), and
    # act(gate) too unless liger's SwiGLU (or the recomputing forward) takes the product at once
    mlp = 2 * h * residual + (2 * i + (0 if config.recomputes_swiglu else i if fused(config) else 2 * i)) * compute
    if shape.experts:  # the router's logits and probabilities (fp32); for each of the token's experts: its copy
        # of the token, gate and up, and their product; where the expert weights take gradients (a full
        # fine-tune, LoRA on them) one more of each width (fitted to what ft-ray's forward keeps on CPU, widths,
        # methods and targets varied: bench/RESULTS.md, session 29)
        i = shape.expert_intermediate
        routed = h + 3 * i + (h + i if config.method == "full" or expert_ranks(config, shape) else 0)
        mlp += shape.experts * (compute + 4) + shape.experts_per_token * routed * expert_bytes(config, compute)
    lora = 0
    if config.method != "full":
        lora = config.lora.rank * len(adapted_linears(config, shape)) * compute
    return (attention + mlp + lora) * ACTIVATION_MARGIN


def logits_bytes(config: JobConfig, shape: Shape, tokens: int, compute: int) -> float:
    """The output layer's logits and the loss: chunked by a fused linear + cross-entropy (liger:
    chunks of about tokens / ceil(vocab / hidden); else fast_paths.chunked_lm_head, not under
    ZeRO-3 nor for a model that caps or scales its logits: chunks of LOGITS_CHUNK_BYTES of fp32
    logits), else the whole logits tensor in the
    compute dtype, its fp32 upcast and its gradient. A reward model's head gives one score per
    token (its output and gradient, fp32)."""
    if config.scores:
        return tokens * 4 * 2
    if fused(config):
        chunk = 2 ** math.ceil(math.log2(max(1, math.ceil(tokens / math.ceil(shape.vocab / shape.hidden)))))
        return chunk * shape.vocab * 4 * 2 + tokens * shape.hidden * 4  # a chunk's logits and grad; grad of the input
    if not config.uses_fast_paths or shape.scaled_logits:
        return tokens * shape.vocab * (compute + 4 + 4)
    from ft_ray.train.fast_paths import LOGITS_CHUNK_BYTES

    rows = min(tokens, max(1, LOGITS_CHUNK_BYTES // (4 * shape.vocab)))
    head_grad = shape.vocab * shape.hidden * 4 if config.method == "full" else 0  # fp32, taken in forward
    # a chunk's fp32 logits, their softmax and its compute-dtype copy; the gradient of the input
    return rows * shape.vocab * (4 + 4 + compute) + tokens * shape.hidden * compute + head_grad


def suggestions(config: JobConfig, shape: Shape, gpu_mib: float) -> list[tuple[str, Plan]]:
    """Changes that make the job fit `gpu_mib`, cheapest first, each with its plan (tried one
    after another, each on top of the ones before)."""
    steps: list[list[str]] = []
    batch = config.train.micro_batch_size
    while batch > 1:
        batch //= 2
        steps.append([f"train.micro_batch_size={batch}",
                      f"train.gradient_accumulation={config.train.gradient_accumulation * config.train.micro_batch_size // batch}"])
    steps.append(["train.gradient_checkpointing=true"])
    dist = config.distributed
    stage = sharding_stage(dist)
    if dist.strategy == "ddp":
        steps.append(["train.optimizer=adamw_8bit"])
    deepspeed = ["distributed.strategy=deepspeed", "train.optimizer=adamw"]  # shards of exact AdamW states first
    if dist.min_workers > 1:  # shard across the workers, never less than now
        if stage < 2:
            steps.append([*deepspeed, "distributed.deepspeed.stage=2"])
        if stage < 3:  # PyTorch's FSDP2 (no extra package; its gathered layers counted), then ZeRO-3
            steps += [["distributed.strategy=fsdp", "train.optimizer=adamw"], [*deepspeed, "distributed.deepspeed.stage=3"]]
        steps.append(["distributed.strategy=deepspeed", "train.optimizer=adamw_8bit"])  # ZeRO's shards in 8 bits
    steps.append([*deepspeed, "distributed.deepspeed.offload_optimizer=cpu"])  # DeepSpeed's CPU AdamW
    # FSDP2 with the weights too in CPU memory: each layer copied in for its forward and backward
    steps.append(["distributed.strategy=fsdp", "train.optimizer=adamw", "distributed.deepspeed.offload_optimizer=none",
                  "distributed.fsdp.offload=cpu"])
    if config.method != "qlora":
        steps.append(["method=qlora"])
    found, current, tried = [], config, []
    for change in steps:
        try:
            candidate = with_settings(current, change)
        except Exception:  # noqa: BLE001 - a combination the config refuses is no suggestion
            continue
        if candidate.model_dump() == current.model_dump():
            continue  # already so
        tried += [setting for setting in change if _changes(current, setting)]
        plan = plan_memory(candidate, shape)
        if plan.fits(gpu_mib):
            shown = [s for s in _dedupe(tried) if _changes(config, s) and _applies(candidate, s)]  # against the job
            found.append((", ".join(shown), plan))
            if len(found) >= 3:
                break
        current = candidate
    return found


def with_settings(config: JobConfig, settings: list[str]) -> JobConfig:
    """A copy of the job with `key=value` settings applied (validated as a job file is)."""
    from ft_ray.config import apply_override, config_from_dict

    raw = config.model_dump(mode="json")
    for setting in settings:
        apply_override(raw, setting)
    return config_from_dict(raw)


def _changes(config: JobConfig, setting: str) -> bool:
    try:
        return with_settings(config, [setting]).model_dump() != config.model_dump()
    except Exception:  # noqa: BLE001 - valid only with the others of its step: a change
        return True


def _applies(config: JobConfig, setting: str) -> bool:
    """Whether a setting does anything in the job: DeepSpeed's only under strategy deepspeed,
    FSDP's under fsdp."""
    for strategy in ("deepspeed", "fsdp"):
        if setting.startswith(f"distributed.{strategy}."):
            return config.distributed.strategy == strategy
    return True


def _dedupe(settings: list[str]) -> list[str]:
    latest: dict[str, str] = {}
    for setting in settings:
        latest[setting.split("=", 1)[0]] = setting
    return list(latest.values())


PART_NAMES = {"weights": "weights", "weight_copies": "16-bit weight copies (autocast)",
              "master_weights": "fp32 master weights", "base_weights": "frozen base weights",
              "gathered_weights": "weights gathered from the shards",
              "lora_weights": "trained weights (adapters)", "gradients": "gradients",
              "expert_weight_copies": "expert weights + LoRA (PEFT), held for backward",
              "optimizer_states": "AdamW states", "reference_weights": "reference model (inline, frozen)",
              "reward_models": "reward models (grpo.rewards)",
              "reward_scoring": "reward model scoring, beyond the activations",
              "teacher_weights": "teacher (distill.teacher, frozen)",
              "teacher_forward": "teacher's forward and the divergence",
              "activations": "activations",
              "logits_and_loss": "logits and loss", "allocator_slack": "allocator slack (5%)",
              "cuda_context": "CUDA context (allowance)"}


@dataclasses.dataclass(frozen=True)
class Loading:
    """The CPU memory a worker's models take while it loads them (MiB): rank 0's, each other
    worker's, and why. The checkpoint's pages, mapped from disk, come beside (shared by a
    node's workers)."""

    rank0_mib: float
    others_mib: float
    how: str


def loading_memory(config: JobConfig, shape: Shape) -> Loading | None:
    """What a worker holds in CPU memory at most while it loads the trained model, an inline
    reference that is a copy of it and a distillation teacher (loaded one after the other and
    held until the engine moves them): whole on every worker, whole on rank 0 alone (fsdp's
    `cpu_ram_efficient_loading`), or a partition each (ZeRO-3's `zero3_init`), the partitions and
    shards on the GPU but on CPU jobs and with offload. None for QLoRA, whose weights are
    quantized on the GPU as they load."""
    if config.method == "qlora":
        return None
    dist, train = config.distributed, config.train
    compute = 4 if train.precision == "fp32" else 2
    load = 4 if config.method == "full" else compute  # a full fine-tune's weights load in fp32
    inline_copy = config.method == "full" and ((config.objective in ("dpo", "kto") and not config.precomputes_reference)
                                               or (config.objective == "grpo" and config.grpo.beta > 0))
    params = shape.params * (2 if inline_copy else 1)  # the trained model and an inline reference, a copy of it
    teacher = None if config.precomputes_teacher else teacher_shape(config)
    teacher_params = teacher.params if teacher else 0  # in the compute dtype
    copies = params * load + teacher_params * compute
    workers = dist.min_workers
    on_cpu = not dist.use_gpu
    if config.partitions_at_load:  # built partitioned in DeepSpeed's dtype: the compute dtype
        held = (params + teacher_params) * compute / workers
        held = held if on_cpu or dist.deepspeed.offload_params == "cpu" else 0
        return Loading(held / MIB, held / MIB, "each model built partitioned" + ("" if held else " on the GPUs")
                       + ", rank 0 alone reading the weights (distributed.deepspeed.zero3_init)")
    if config.loads_on_rank0:
        shard = copies / workers if on_cpu or dist.fsdp.offload == "cpu" else 0
        return Loading(copies / MIB, shard / MIB, "rank 0 alone reads the weights, the others build the model empty "
                       "and take their shards" + ("" if shard else " on the GPU")
                       + " (distributed.fsdp.cpu_ram_efficient_loading)")
    return Loading(copies / MIB, copies / MIB,
                   f"every worker reads the weights whole, in {'fp32' if load == 4 else train.precision}")


def describe_loading(loading: Loading) -> str:
    others = (f"each worker {loading.rank0_mib / 1024:,.1f} GiB" if loading.rank0_mib == loading.others_mib else
              f"rank 0 {loading.rank0_mib / 1024:,.1f} GiB, each other worker {loading.others_mib / 1024:,.1f} GiB")
    return (f"CPU memory while loading: {others}: {loading.how}; plus the checkpoint's pages, mapped from disk "
            "(shared by a node's workers)")


def describe(config: JobConfig, plan: Plan) -> str:
    """The plan as a table, one part per line."""
    dist = config.distributed
    how = (f"{config.method}, {dist.strategy}" + (f" ZeRO-{dist.deepspeed.stage}" if dist.strategy == "deepspeed" else "")
           + f", {plan.workers} worker(s), {config.train.precision}, micro batch {config.train.micro_batch_size} x "
           f"{config.model.max_seq_len} tokens" + (", gradient checkpointing" if config.train.gradient_checkpointing else "")
           + (", 8-bit AdamW" if config.train.optimizer == "adamw_8bit" else ""))
    rows = [(PART_NAMES[k], v) for k, v in plan.parts.items() if v] + [("peak", plan.peak_mib)]
    width = max(len(name) for name, _ in rows)
    lines = [f"plan for {config.run_name} ({how}), per worker:"]
    lines += [f"  {name:<{width}}  {value:>10,.0f} MiB" for name, value in rows]
    if plan.startup_mib:
        why = "QLoRA's 4-bit layers load whole" if config.method == "qlora" else "distributed.deepspeed.zero3_init: false"
        lines.append(f"  at the start, before ZeRO-3 partitions it, the whole model on each GPU: "
                     f"{plan.startup_mib:,.0f} MiB" + (" (the peak)" if plan.startup_mib > sum(plan.parts.values()) else "")
                     + f" ({why})")
    if plan.offloaded_mib:
        lines.append(f"  and in CPU memory (offload): {plan.offloaded_mib:,.0f} MiB per worker, "
                     f"{plan.offloaded_mib * plan.workers / 1024:,.1f} GiB for the {plan.workers} worker(s)")
    return "\n".join(lines)


def one_line(plan: Plan, gpu_mib: float | None = None) -> str:
    fit = "" if gpu_mib is None else (" (fits" if plan.fits(gpu_mib) else " (does not fit") + f" {gpu_mib / 1024:.0f} GiB)"
    offloaded = f"; {plan.offloaded_mib / 1024:.1f} GiB per worker in CPU memory" if plan.offloaded_mib else ""
    return (f"plan: peak {plan.peak_mib / 1024:.1f} GiB per worker{fit}; activations "
            f"{plan.parts['activations'] / 1024:.1f} GiB for {plan.tokens_per_micro_batch} tokens per micro batch"
            + offloaded)


def worst_case(config: JobConfig, shape: Shape) -> tuple[JobConfig, Plan]:
    """The job (a sweep: its trial with the most memory, over the edges of every searched
    range) and its plan."""
    import itertools

    space = config.tune.search_space if config.tune else {}
    if not space:
        return config, plan_memory(config, shape)
    base = config.model_dump(mode="json")
    keys = list(space)
    worst: tuple[JobConfig, Plan] | None = None
    for values in itertools.islice(itertools.product(*(edge_values(space[k]) for k in keys)), 256):
        trial = JobConfig.model_validate(with_overrides(base, dict(zip(keys, values))))
        plan = plan_memory(trial, shape)
        if worst is None or plan.peak_mib > worst[1].peak_mib:
            worst = trial, plan
    return worst


def as_json(config: JobConfig, plan: Plan, gpu_mib: float | None, fixes: list[tuple[str, Plan]]) -> dict[str, Any]:
    return {"run_name": config.run_name, "peak_mib": round(plan.peak_mib), "allocated_mib": round(plan.allocated_mib),
            "parts_mib": {k: round(v, 1) for k, v in plan.parts.items()}, "workers": plan.workers,
            "tokens_per_micro_batch": plan.tokens_per_micro_batch, "offloaded_mib": round(plan.offloaded_mib),
            "startup_mib": round(plan.startup_mib),
            "gpu_mib": gpu_mib,
            "fits": None if gpu_mib is None else plan.fits(gpu_mib),
            "suggestions": [{"settings": s, "peak_mib": round(p.peak_mib)} for s, p in fixes]}


# MFU ft-ray measured per method (bench/RESULTS.md, "GPU, session 9": one H100, the 1B Llama
# shape, bf16, 8 x 2048 tokens per step, fused kernels): the time estimate assumes them.
MEASURED_MFU = {"full": 0.462, "lora": 0.369, "qlora": 0.345}


def train_tokens(config: JobConfig) -> tuple[int, str]:
    """The job's training tokens per epoch and how they were found: the prepared data's
    stats, else counted as `ft-ray validate` counts (every record, the first ones' lengths)."""
    from ft_ray.data.prepared import prepared_stats
    from ft_ray.validate import validate_data

    stats = prepared_stats(config)
    if stats is not None:
        return stats.train_tokens, "the prepared data"
    counts = validate_data(config)["counts"]
    return counts["train_tokens_estimate"], (f"{counts['train_records']:,} records x the mean length of "
                                             "the first ones (ft-ray validate)")


def plan_time(config: JobConfig, shape: Shape, tokens: int, gpu: str) -> dict[str, Any]:
    """Steps, hours and GPU-hours of the job at the MFU measured for its method on `gpu`'s peak."""
    from ft_ray.train.flops import KNOWN_PEAK_TFLOPS, training_flops

    train, workers = config.train, config.distributed.max_workers
    per_step = train.micro_batch_size * config.model.max_seq_len * train.gradient_accumulation * workers
    steps = train.max_steps or math.ceil(tokens * train.epochs / per_step)
    shape = trained_shape(config, shape)
    base = shape.active_params - shape.embedding_params  # a mixture of experts: the experts a token goes to
    flops = training_flops(base, adapter_params(config, shape), shape.layers, shape.hidden, config.method,
                           config.model.max_seq_len)
    peak = next((t for key, t in KNOWN_PEAK_TFLOPS.items() if key.lower() == gpu.lower()), None)
    if peak is None:
        raise InputError(f"--gpu-type {gpu}: known are {', '.join(KNOWN_PEAK_TFLOPS)}")
    per_worker = MEASURED_MFU[config.method] * peak * 1e12 / flops
    hours = steps * per_step / (per_worker * workers) / 3600
    return {"steps": steps, "tokens_per_step": per_step, "tokens_per_s_per_worker": round(per_worker),
            "hours": round(hours, 2), "gpu_hours": round(hours * workers, 2), "gpu": gpu,
            "mfu_assumed": MEASURED_MFU[config.method], "experts": shape.experts}


def describe_time(config: JobConfig, time: dict[str, Any], source: str, price: float | None) -> str:
    cost = f"; ${time['gpu_hours'] * price:,.0f} at ${price:g} per GPU-hour" if price else ""
    hours = time["hours"]
    took = f"{hours:.1f} h" if hours >= 1 else f"{max(1, round(hours * 60))} min"
    return (f"time: about {took} on {config.distributed.max_workers} x {time['gpu']} "
            f"({time['gpu_hours']:.1f} GPU-hours{cost}): {time['steps']:,} steps of {time['tokens_per_step']:,} "
            f"tokens, {time['tokens_per_s_per_worker']:,} tokens/s per GPU at the {time['mfu_assumed']:.1%} MFU "
            f"measured for {config.method} on an H100 (bench/RESULTS.md)"
            + (" on a dense model (a mixture of experts runs below it: at best)" if time.get("experts") else "")
            + f"; tokens from {source}")


# GPU memory by Ray's accelerator_type resource name (GB as sold; the smaller card where a name
# covers two). Ray reports the type, not the memory.
GPU_MEMORY_GB = {"H200": 141, "H100": 80, "A100-80G": 80, "A100-40G": 40, "A100": 40, "L40S": 48, "A10G": 24,
                 "L4": 24, "T4": 16, "V100": 16}


def cluster_gpus(nodes: list[dict]) -> list[tuple[str, float]]:
    """(accelerator type, memory MiB) of every GPU of a cluster, from its nodes' total
    resources (`{"GPU": 8, "accelerator_type:H100": 1, ...}`); an unknown type has no memory."""
    gpus = []
    for resources in nodes:
        kind = next((k.split(":", 1)[1] for k in resources if k.startswith("accelerator_type:")), "unknown")
        memory = GPU_MEMORY_GB.get(kind, 0) * 1e9 / MIB
        gpus += [(kind, memory)] * int(resources.get("GPU", 0))
    return gpus


def cluster_nodes(address: str) -> list[dict]:
    """The total resources of each alive node of the Ray cluster at `address` (the state API)."""
    from ray.util.state import list_nodes

    return [node.resources_total for node in list_nodes(address=address, filters=[("state", "=", "ALIVE")],
                                                         raise_on_missing_output=False)]


def cluster_fit(config: JobConfig, address: str) -> tuple[bool, str]:
    """Whether the job (a sweep: its largest trial; a precomputed teacher's pass where it
    holds more than a worker) fits the GPUs of the cluster at `address`, and a line saying so
    (`fit_line`)."""
    if not config.distributed.use_gpu:
        return True, "plan: a CPU job"
    shape, _ = model_shape(config, network=False)
    job, plan = worst_case(config, shape)
    gpus = cluster_gpus(cluster_nodes(address))
    ahead = teacher_pass(job, network=False)
    if ahead and ahead.peak_mib > plan.peak_mib:
        return fit_line(ahead, gpus, "per model actor of the teacher pass")
    return fit_line(plan, gpus)


def fit_line(plan: Plan, gpus: list[tuple[str, float]], per: str = "per worker") -> tuple[bool, str]:
    """Whether a worker's plan (or another GPU process's: `per` says whose) fits the smallest
    of these GPUs ((type, MiB) as `cluster_gpus` gives them), and a line saying so. With no
    GPU up (an autoscaling cluster starts its GPU nodes for the job) or none of a type ft-ray
    knows, nothing is checked: it fits."""
    peak = f"plan: peak {plan.peak_mib / 1024:.1f} GiB {per}"
    if not gpus:
        return True, f"{peak}; no GPU node is up on the cluster now (autoscaling?): not checked"
    known = [memory for _, memory in gpus if memory]
    if not known:
        return True, f"{peak}; the cluster's GPU type ({gpus[0][0]}) is unknown to ft-ray: not checked"
    kinds = ", ".join(sorted({kind for kind, _ in gpus}))
    return plan.fits(min(known)), f"{peak}; the cluster's smallest GPU ({kinds}) has {min(known) / 1024:.1f} GiB"


def smallest_gpu(address: str) -> tuple[str, float | None]:
    """(the GPU types, the smallest known GPU's memory in MiB or None) of the cluster at `address`."""
    gpus = cluster_gpus(cluster_nodes(address))
    known = [memory for _, memory in gpus if memory]
    return ", ".join(sorted({k for k, _ in gpus})) or "none", (min(known) if known else None)


def gpu_share(peak_mib: float, gpu_mib: float) -> tuple[float, str]:
    """The fraction of a GPU a one-worker trial asks for: 1/k when k such trials fit the GPU."""
    together = int(gpu_mib // peak_mib) if peak_mib > 0 else 1
    if together <= 1:
        return 1.0, f"a trial's peak {peak_mib / 1024:.1f} GiB leaves no room for another on {gpu_mib / 1024:.1f} GiB"
    return 1 / together, f"{together} trials of peak {peak_mib / 1024:.1f} GiB share each {gpu_mib / 1024:.1f} GiB GPU"
