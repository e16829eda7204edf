"""The one schema of an ft-ray job, YAML loading, `--set` overrides and readable errors.

Every knob of a job lives here. Models forbid unknown keys, so a typo fails at load time
with the key, the file and the line, instead of being silently ignored by a worker.
"""

from __future__ import annotations

import copy
import difflib
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator


class ConfigError(ValueError):
    """A job file that cannot run; `problems` holds one readable line per mistake."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("\n".join(problems))


class InputError(ValueError):
    """Input found wrong after the config loaded (data files, paths, checkpoints): exit 2."""


FOLDER_NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]*$"  # a run, trial or winner folder: never "..", "/" or empty


def check_folder_name(name: object, what: str) -> str:
    """A folder name read from a file ft-ray did not just write (a sweep's sweep.json), checked
    like a run name so it cannot point outside the folder it belongs in.

    Raises:
        InputError: naming `what` and the bad value.
    """
    if not isinstance(name, str) or not re.match(FOLDER_NAME, name):
        raise InputError(f"{what}: {name!r} is not a folder name (letters, digits, '.', '_', '-'; "
                         "not starting with '.')")
    return name


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(Section):
    name_or_path: str = Field("builtin:tiny-llama", description=(
        "hub id, local HF folder, s3:// folder (read with the storage section's endpoint, copied once to each node's "
        "storage.model_cache), or builtin:tiny-llama"))
    max_seq_len: int = Field(256, gt=8, description="packed sequence length in tokens")
    revision: str | None = Field(None, description="hub revision (branch, tag or commit)")
    trust_remote_code: bool = Field(False, description="run code shipped with the model; off unless you trust it")
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = Field("sdpa", description=(
        "sdpa: packed training batches attend within each example's span (no work across examples); "
        "flash_attention_2: its varlen kernel (needs flash-attn)"))
    add_tokens: list[str] = Field(default_factory=list, description=(
        "tokens added to the tokenizer (e.g. a chat format's markers): the embeddings grow where they have no "
        "spare rows; with lora/qlora see new_tokens"))
    new_tokens: Literal["rows", "whole"] = Field("rows", description=(
        "how add_tokens train with lora/qlora: rows = only their rows of the embeddings and the output layer "
        "(PEFT's trainable tokens, saved with the adapter); whole = embed_tokens and lm_head train in full and are "
        "saved with the adapter (for a 128k vocabulary and width 4096: about 1B more trained weights, 17 GB with "
        "their gradients and AdamW states)"))
    chat_template: str | None = Field(None, description=(
        "a Jinja chat template, inline or the path of a file, for a base model without one (or to replace it)"))
    untrained_tokens: Literal["mend", "keep"] = Field("mend", description=(
        "special tokens whose embedding or output row the base never trained (Llama 3 base's chat markers): "
        "mend = those rows start at the mean of the trained ones and train (with lora/qlora, saved with the "
        "adapter); keep = as the base has them"))
    rope_scaling: Literal["none", "linear", "yarn"] = Field("none", description=(
        "train past the base's context window (max_position_embeddings) by stretching its RoPE positions: "
        "linear = position interpolation, yarn = YaRN (keeps short contexts nearly as they were); the factor is "
        "max_seq_len over the window, rounded up, unless rope_factor says"))
    rope_factor: float | None = Field(None, gt=1, description=(
        "with rope_scaling: how many times the window to stretch to (e.g. train at 16k for a 32k target)"))
    adapter: str | None = Field(None, description=(
        "a LoRA adapter to train on from where it is (lora/qlora on this base model): its folder "
        "(adapter_config.json), or a run folder, checkpoint or sweep winner holding one, local or s3:// "
        "(read with the storage section's endpoint); its rank, alpha, "
        "targets and trained token rows are the run's, and DPO/KTO/GRPO's reference is the base with it"))

    # the job's storage section (set by JobConfig): the endpoint an s3:// model is read with
    _storage: Any = PrivateAttr(None)

    @model_validator(mode="after")
    def _rope_factor_scales(self) -> "ModelConfig":
        if self.rope_factor is not None and self.rope_scaling == "none":
            raise ValueError("model.rope_factor needs model.rope_scaling (linear or yarn)")
        if self.revision and self.name_or_path.startswith("s3://"):
            raise ValueError("model.revision: a hub revision; an s3:// model is the files in its folder")
        return self

    def use_storage(self, storage: "StorageConfig") -> None:
        """Read an s3:// model with `storage`'s endpoint, region and tries."""
        self._storage = storage

    @property
    def storage(self) -> "StorageConfig":
        """Where an s3:// model is read from: the job's storage section, or (a section on its
        own) the environment's endpoint (AWS_ENDPOINT_URL)."""
        return self._storage or StorageConfig()


FormatName = Literal["auto", "text", "instruction", "chat", "completion", "segments", "preference", "kto"]


class SourceConfig(Section):
    path: str | None = Field(None, description=(
        "file, folder, glob or s3:// prefix (.jsonl[.gz], .json, .parquet, .csv, .tsv, .txt), or a folder written by "
        "datasets' save_to_disk"))
    hf: str | None = Field(None, description=(
        "instead of path, a Hugging Face dataset: a hub id (needs the network or the local cache) or a local "
        "dataset repository folder"))
    split: str | None = Field(None, description="the split of an hf dataset or a saved DatasetDict folder (default: train)")
    revision: str | None = Field(None, description="hf: branch, tag or commit (default: main)")
    subset: str | None = Field(None, description="hf: the dataset's configuration (load_dataset's name)")
    weight: float = Field(1.0, gt=0, description="2 = every example twice, 0.5 = a stable half of them")
    format: FormatName | None = Field(None, description="default: data.format")
    fields: dict[str, str] = Field(default_factory=dict, description="default: data.fields")

    @model_validator(mode="after")
    def _path_or_hf(self) -> "SourceConfig":
        if bool(self.path) == bool(self.hf):
            raise ValueError("a source has either a path or an hf dataset")
        if self.path and (self.revision or self.subset):
            raise ValueError("revision and subset are settings of an hf source")
        return self

    @property
    def where(self) -> str:
        """The source as messages name it."""
        if self.path:
            return self.path + (f" [{self.split}]" if self.split else "")
        return f"hf:{self.hf}" + (f"/{self.subset}" if self.subset else "") + (
            f"@{self.revision}" if self.revision else "") + f" [{self.split or 'train'}]"


EVAL_SET_NAME = r"^[a-z][a-z0-9_]*$"
RESERVED_EVAL_SET_NAMES = ("nll",)  # ORPO logs eval_nll_loss


def eval_set_metric(name: str, metric: str = "loss") -> str:
    """What a data.eval_sets set's `metric` is logged as: eval_<name>_<metric>."""
    return f"eval_{name}_{metric}"


class DataConfig(Section):
    train: str | None = Field(None, description="training records: file, folder, glob or s3:// prefix")
    sources: list[SourceConfig] = Field(default_factory=list, description="several weighted sources instead of train")
    eval: str | SourceConfig | None = Field(None, description=(
        "held-out records (a path, or a source such as {hf: ID, split: test}); default: split eval_fraction off train"))
    eval_fraction: float = Field(0.1, ge=0, lt=1, description="share of train records held out when eval is unset")
    eval_sets: dict[str, str | SourceConfig] = Field(default_factory=dict, description=(
        "more held-out sets, by name (a path or a source each), scored at every evaluation as eval_<name>_loss: "
        "e.g. {general: general.jsonl} shows what the run costs on text it does not train for (forgetting). "
        "data.eval (or the split) stays the set that picks checkpoints, stops early and ft-ray eval compares"))
    format: FormatName = Field("auto", description="auto: chosen per source from its first records")
    fields: dict[str, str] = Field(default_factory=dict,
                                   description="ft-ray's field name -> your column, e.g. {instruction: question}")
    pack: bool = Field(True, description="pack several records per sequence (attention stays within a record)")
    loss_on: Literal["answers", "all", "last_answer"] = Field("answers", description=(
        "what a supervised example trains on: answers (outputs, completions, assistant turns); all (every token: "
        "prompts and user turns too); last_answer (a conversation's final assistant turn; earlier ones are context)"))
    shuffle_seed: int | None = Field(None, description="seed of the record shuffle; default train.seed")
    max_rejected_fraction: float = Field(0.01, ge=0, le=1, description="fail the run when more records are bad")
    max_record_tokens: int | None = Field(None, gt=0, description="longest record kept whole; default model.max_seq_len")
    overlong: Literal["truncate", "drop"] = Field("truncate", description=(
        "what happens to longer records: truncate (text: cut into windows of model.max_seq_len that all "
        "train; other formats: cut at the end, counted in the summary) or drop"))
    text_unit: Literal["line", "paragraph", "document"] = Field("line", description=(
        "what one record of a plain-text file (.txt) is: a line, a block between blank lines, or the whole file"))
    text_stride: int = Field(0, ge=0, description=(
        "tokens each window of a long text record repeats from the window before, as context (not trained again)"))
    max_record_bytes: int = Field(8 << 20, gt=0, description=(
        "a record (line, JSON array item) longer than this is rejected as too_large without being held in memory"))
    max_decompressed_ratio: float = Field(100.0, gt=1, description=(
        "a compressed file that grows past this many times its size is cut there (a gzip bomb)"))
    prepared: str | None = Field(None, description="tokenized+packed Parquet (ft-ray prepare); "
                                                   "default <storage.path>/prepared/<fingerprint>")

    @model_validator(mode="after")
    def _one_way_to_name_sources(self) -> "DataConfig":
        if bool(self.train) == bool(self.sources):
            raise ValueError("set either data.train (one source) or data.sources (a list of {path, weight})")
        for name in self.eval_sets:
            if not re.match(EVAL_SET_NAME, name) or name in RESERVED_EVAL_SET_NAMES:
                raise ValueError(f"data.eval_sets: {name!r} cannot name a set: its metrics are eval_<name>_loss, so a "
                                 "name is lowercase letters, digits and _ (starting with a letter), and not "
                                 f"{' or '.join(RESERVED_EVAL_SET_NAMES)}")
        return self

    def all_sources(self) -> list[SourceConfig]:
        """The training sources, each with its own format and field mapping filled in."""
        listed = self.sources or [SourceConfig(path=self.train)]
        return [s.model_copy(update={"format": s.format or self.format, "fields": s.fields or self.fields})
                for s in listed]

    def keyed_sources(self) -> list[tuple[str, SourceConfig]]:
        """`all_sources` with the config key each comes from (for messages)."""
        keys = [f"data.sources[{i}]" for i in range(len(self.sources))] if self.sources else ["data.train"]
        return list(zip(keys, self.all_sources()))

    def eval_source(self) -> SourceConfig | None:
        return self._filled(self.eval) if self.eval else None

    def eval_set_sources(self) -> list[tuple[str, str, SourceConfig]]:
        """(name, config key, source) of each of `eval_sets`, format and fields filled in."""
        return [(name, f"data.eval_sets.{name}", self._filled(source)) for name, source in self.eval_sets.items()]

    def _filled(self, source: str | SourceConfig) -> SourceConfig:
        """A held-out source with the data section's format and field mapping where it has none."""
        if isinstance(source, SourceConfig):
            return source.model_copy(update={"format": source.format or self.format,
                                             "fields": source.fields or self.fields})
        return SourceConfig(path=source, format=self.format, fields=self.fields)


class LoraConfig(Section):
    rank: int = Field(8, gt=0)
    alpha: float = Field(16, gt=0)
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: list[str] | Literal["all-linear"] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    use_dora: bool = Field(False, description="DoRA: a learned magnitude per output beside the LoRA direction "
                                              "(slower step: the fused LoRA path does not apply)")
    use_rslora: bool = Field(False, description="rsLoRA: scale the update by alpha/sqrt(rank) instead of alpha/rank")
    init: Literal["default", "gaussian", "pissa", "olora", "orthogonal"] = Field("default", description=(
        "initialisation of A and B (PEFT's init_lora_weights); pissa/olora start from the base weights' "
        "principal directions (and change the frozen base accordingly)"))
    modules_to_save: list[str] = Field(default_factory=list, description=(
        "modules trained in full next to the adapters and saved with them, e.g. [lm_head, embed_tokens]"))
    loraplus_lr_ratio: float = Field(1.0, gt=0, description=(
        "LoRA+: the B matrices learn at this many times train.learning_rate (A, DoRA magnitudes and "
        "modules_to_save at train.learning_rate); the LoRA+ paper suggests 16. 1: off"))


class DeepSpeedConfig(Section):
    """ZeRO settings; the DeepSpeed JSON is generated from these and the train section."""

    stage: Literal[0, 1, 2, 3] = Field(2, description="0 off, 1 optimizer, 2 +gradients, 3 +parameters sharded")
    offload_optimizer: Literal["none", "cpu"] = Field("none", description="optimizer state in CPU memory")
    offload_params: Literal["none", "cpu"] = Field("none", description="parameters in CPU memory (stage 3)")
    overlap_comm: bool = True
    zero3_init: bool = Field(True, description=(
        "stage 3: each model is built partitioned across the workers (deepspeed.zero.Init, as transformers loads "
        "under DeepSpeed) and rank 0 alone reads its weights, so a worker holds its shard while it loads, not the "
        "whole model (Accelerate's zero3_init_flag). Not for qlora (its 4-bit layers load whole on every worker)"))
    config_override: dict[str, Any] = Field(default_factory=dict, description=(
        "raw DeepSpeed keys merged over the generated config, for experts"))


class FSDPConfig(Section):
    """PyTorch FSDP2 settings (distributed.strategy: fsdp)."""

    reshard_after_forward: bool = Field(True, description=(
        "free each layer's gathered weights after its forward and gather them again for its backward "
        "(as ZeRO-3); false keeps them to backward: less traffic, a whole model's 16-bit weights per worker"))
    offload: Literal["none", "cpu"] = Field("none", description=(
        "cpu: each worker's shard of the weights, their gradients and AdamW's states in CPU memory (torch's "
        "CPUOffloadPolicy), each layer copied to the GPU for its forward and backward and the optimizer stepping "
        "on the CPU: the GPU holds a few gathered layers and the activations, at the cost of the copies and a CPU "
        "step (as ZeRO-3 with both DeepSpeed offloads; not with qlora's 4-bit weights)"))
    cpu_ram_efficient_loading: bool = Field(True, description=(
        "rank 0 alone reads the model's weights into CPU memory; the other workers build its layers empty (on "
        "the meta device) and take their shards from rank 0 once sharded, so a node holds the model once while "
        "it loads, not once per worker (Accelerate's fsdp_cpu_ram_efficient_loading). LoRA's weights come "
        "from rank 0 too (a continued adapter's, pissa's or olora's). Not for qlora: it loads on every worker"))


class QuantizationConfig(Section):
    """bitsandbytes settings of the frozen base model (method: qlora)."""

    bits: Literal[4] = 4
    quant_type: Literal["nf4", "fp4"] = "nf4"
    double_quant: bool = True
    compute_dtype: Literal["float32", "bfloat16", "float16"] = "bfloat16"
    quant_storage: Literal["uint8", "bfloat16", "float16", "float32"] = Field("uint8", description=(
        "storage dtype of packed 4-bit weights; ZeRO-3 and fsdp need a float one (e.g. bfloat16) to shard them"))


class DistributedConfig(Section):
    num_workers: int | tuple[int, int] = Field(2, description=(
        "training workers, or [min, max] for an elastic run that starts with what the cluster has "
        "and grows or shrinks on restarts (DDP, FSDP or ZeRO stage 0: ZeRO's shards are tied to the count)"))
    use_gpu: bool = False
    strategy: Literal["ddp", "deepspeed", "fsdp"] = Field("ddp", description=(
        "how workers share the work: ddp (each a whole copy), deepspeed (ZeRO), fsdp (PyTorch FSDP2: weights, "
        "gradients and AdamW states sharded)"))
    deepspeed: DeepSpeedConfig = Field(default_factory=DeepSpeedConfig)
    fsdp: FSDPConfig = Field(default_factory=FSDPConfig)

    @field_validator("num_workers")
    @classmethod
    def _positive_range(cls, value: int | tuple[int, int]) -> int | tuple[int, int]:
        low, high = (value, value) if isinstance(value, int) else value
        if low < 1 or high < low:
            raise ValueError(f"must be a count >= 1 or a range [min, max] with 1 <= min <= max, got {value}")
        return value

    @field_validator("gpus_per_worker")
    @classmethod
    def _gpu_share(cls, value: float | str) -> float | str:
        if value != "auto" and not 0 < value <= 1:
            raise ValueError(f"must be in (0, 1] (one device per worker) or auto, got {value}")
        return value

    @property
    def gpu_share(self) -> float:
        """The GPUs each worker asks Ray for: `gpus_per_worker`, 1 while still auto."""
        return 1.0 if self.gpus_per_worker == "auto" else float(self.gpus_per_worker)

    @property
    def max_workers(self) -> int:
        return self.num_workers if isinstance(self.num_workers, int) else self.num_workers[1]

    @property
    def min_workers(self) -> int:
        return self.num_workers if isinstance(self.num_workers, int) else self.num_workers[0]

    @property
    def elastic(self) -> bool:
        return not isinstance(self.num_workers, int)
    cpus_per_worker: float = Field(1, gt=0, description="Ray CPUs each training worker holds")
    gpus_per_worker: float | Literal["auto"] = Field(1.0, description=(
        "GPUs each training worker holds (use_gpu): 1, a fraction for several one-worker sweep trials per "
        "GPU, or auto: in a sweep, the share of the cluster's smallest GPU that ft-ray plan says a trial needs"))
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field(
        "PACK", description="PACK fills nodes (fast collectives); SPREAD puts workers on different nodes")
    max_failures: int = Field(2, ge=0, description="worker-group restarts from the latest checkpoint before giving up")
    timeout_s: int = Field(1800, gt=0, description="collective timeout; a dead peer becomes a failure, not a hang")


class TrainConfig(Section):
    learning_rate: float = Field(2e-4, gt=0)
    max_steps: int | None = Field(None, gt=0, description="optimizer steps; overrides epochs")
    epochs: float = Field(1, gt=0)
    micro_batch_size: int = Field(4, gt=0, description="sequences per worker per forward pass")
    gradient_accumulation: int = Field(1, gt=0)
    warmup_steps: int = Field(10, ge=0, description="steps the learning rate rises over, from near 0 (at most half the run)")
    lr_schedule: Literal["cosine", "linear", "constant"] = Field("cosine", description=(
        "after warmup: cosine or linear decay to min_lr_ratio at the last step, or constant"))
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="the last step's learning rate as a share of learning_rate")
    weight_decay: float = Field(0.0, ge=0, description=(
        "AdamW's decoupled weight decay, on matrices only: norms' weights, biases and DoRA magnitudes take none"))
    max_grad_norm: float = Field(1.0, gt=0)
    neftune_alpha: float = Field(0.0, ge=0, description=(
        "NEFTune: uniform noise on the input embeddings while training, alpha/sqrt(tokens x dims) of each "
        "example (5 in its paper); 0: off"))
    eval_every: int = Field(50, gt=0, description="optimizer steps between evaluations")
    early_stopping_patience: int | None = Field(None, gt=0, description=(
        "stop when this many evaluations in a row have not lowered eval_loss below its best (each new best is "
        "checkpointed); none: train every step"))
    early_stopping_min_delta: float = Field(0.0, ge=0, description=(
        "with early_stopping_patience: an eval_loss counts as lower only by more than this"))
    checkpoint_every: int = Field(100, gt=0, description="optimizer steps between checkpoints")
    keep_checkpoints: int = Field(2, gt=0, description="newest checkpoints kept in storage")
    log_every: int = Field(1, gt=0, description="optimizer steps between metrics.jsonl lines")
    trace_samples: bool = Field(False, description="write the packed-sequence ids each rank consumed per step "
                                                   "to samples-rank<N>.jsonl (audits determinism and resume)")
    seed: int = 42
    epoch_shuffle_buffer: int = Field(1024, ge=0, description=(
        "each epoch after the first reads the packed sequences in a new seeded order, shuffled within a "
        "window of this many (Ray Data's local shuffle buffer, held in each worker's memory): other "
        "neighbours in each batch. 0: every epoch in the first's order"))
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    gradient_checkpointing: bool = Field(False, description="recompute activations in backward: less memory, ~30% more compute")
    peak_tflops: float | None = Field(None, gt=0, description=(
        "peak dense TFLOP/s of one worker's device for MFU; default: known GPUs (H100/H200 bf16: 989), else no MFU"))
    fused_kernels: Literal["auto", "liger", "none"] = Field("auto", description=(
        "liger-kernel's fused RMSNorm, RoPE, SwiGLU and linear+cross-entropy (no logits tensor) on CUDA; "
        "auto: when installed and on a GPU; plain torch on CPU. Not none: LoRA layers also add their "
        "scaled update inside the adapter's GEMM, and where liger is not used the LM head's loss is taken "
        "in chunks of rows, without the full logits, as are the preference objectives' per-token log-probs "
        "on every device (not under ZeRO-3)"))
    recompute_swiglu: bool = Field(True, description=(
        "full fine-tunes: the MLP keeps gate and up for backward, not act(gate)*up (recomputed, one "
        "elementwise pass); 1B Llama, 16k tokens per step, H100: peak 40.6 -> 36.0 GiB for 2.4% of the "
        "step time; not under ZeRO-3"))
    fp32_residual: bool = Field(False, description=(
        "bf16/fp16: keep the hidden states between blocks in fp32 (what autocast does with fp32 weights); "
        "false: in the compute dtype, like a 16-bit model and Megatron-LM's default: less activation memory"))
    compile: bool = Field(False, description="torch.compile the model's forward (the first steps wait for it)")
    optimizer: Literal["adamw", "adamw_8bit"] = Field("adamw", description=(
        "adamw: torch's AdamW, fp32 states (8 bytes per trained weight); adamw_8bit: bitsandbytes' 8-bit AdamW, "
        "blockwise-quantized states (about 2 bytes per trained weight; tensors under 4096 values keep fp32 ones): "
        "for a full fine-tune whose states do not fit; with DDP or DeepSpeed (ZeRO shards the 8-bit states too), "
        "not with fsdp or offload_optimizer"))
    fused_optimizer: bool = Field(True, description="fused AdamW: one kernel for every parameter's update (adamw)")
    prefetch_batches: int = Field(2, ge=0, description="batches Ray Data prepares ahead of each worker")
    compare_generations: int = Field(0, ge=0, description=(
        "held-out prompts answered by the base model and the variant after training, printed and "
        "saved to samples.json; runs on the driver, so keep 0 for large models"))


class StorageConfig(Section):
    path: str = Field("./runs", description="local folder or s3://bucket/prefix holding runs")
    endpoint_url: str | None = Field(None, description="S3-compatible endpoint (MinIO, moto, ...)")
    region: str | None = None
    model_cache: str = Field("~/.cache/ft-ray/models", description=(
        "where each node keeps the copies of the models it reads from object storage (an s3:// model.name_or_path "
        "or reward model), for later runs too: a local folder of every node with room for them; when a copy does "
        "not fit the disk (or storage.model_cache_max_gib), the models used longest ago make room"))
    model_cache_max_gib: float | None = Field(None, gt=0, description=(
        "most GiB of models storage.model_cache keeps on a node: after a copy that would pass it, the models used "
        "longest ago are removed (never one used in the last hour); none: as many as the disk holds"))
    max_attempts: int = Field(10, gt=0, description=(
        "tries of each object-store request (exponential backoff: an unreachable store fails after about "
        "80 s at 10) before it fails; `validate` and `plan` try at most 3 times"))


class WandbConfig(Section):
    mode: Literal["online", "offline", "disabled"] = "disabled"
    project: str = "ft-ray"
    entity: str | None = None
    dir: str | None = Field(None, description="where offline runs are written; default the run folder")
    group: str | None = Field(None, description="W&B group (a sweep sets it to the sweep name)")


class TrackingConfig(Section):
    wandb: WandbConfig = Field(default_factory=WandbConfig)


class SchedulerConfig(Section):
    type: Literal["asha", "fifo"] = Field("asha", description="asha stops trials behind the others early; fifo runs all")
    grace_period_steps: int = Field(50, gt=0, description="optimizer steps every trial runs before ASHA may stop it")
    reduction_factor: float = Field(3, gt=1, description="ASHA keeps the best 1/reduction_factor at each rung")


class TuneConfig(Section):
    """Sweep settings, read by `ft-ray tune`."""

    name: str | None = Field(None, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", description=(
        "sweep name: the folder <storage.path>/<name>/ and the W&B group; default run_name"))
    metric: str = Field("eval_loss", description="what ranks trials (reported at every eval)")
    mode: Literal["min", "max"] = "min"
    num_samples: int = Field(4, gt=0, description="trials (with search_alg grid: repeats of the whole grid)")
    max_concurrent_trials: int | Literal["auto"] = Field("auto", description=(
        "auto: as many as the cluster's CPUs (or GPUs) hold at distributed.num_workers each"))
    search_alg: Literal["random", "grid", "optuna"] = "random"
    seed: int | None = Field(0, description=(
        "seed of the search: the same sweep file samples the same trials (random, grid and optuna); "
        "null draws new ones each time"))
    scheduler: SchedulerConfig = Field(default_factory=SchedulerConfig)
    search_space: dict[str, dict[str, Any]] = Field(default_factory=dict, description=(
        "dotted job key -> {choice: [..]} | {grid: [..]} | {uniform: [lo, hi]} | {loguniform: [lo, hi]} | {randint: [lo, hi]}"))
    export_top_k: int = Field(1, ge=0, description="best trials exported to <sweep>/winners/")
    trial_cpus: float = Field(0.05, gt=0, description=(
        "CPUs held by each trial's driver (a fraction: its training workers hold their own)"))

    @field_validator("max_concurrent_trials")
    @classmethod
    def _positive(cls, value: int | str) -> int | str:
        if isinstance(value, int) and value < 1:
            raise ValueError("must be >= 1 or auto")
        return value


class ExportConfig(Section):
    merge: bool = Field(False, description="also write the base model with the LoRA adapter folded in (sweep winners)")


class EvalConfig(Section):
    """Does fine-tuning pay? The variant against the base model and against few-shot prompting
    of it, on the held-out examples (`ft-ray eval`)."""

    after_training: bool = Field(False, description="evaluate when `ft-ray train` / `ft-ray tune` finishes "
                                                    "(the run, or every exported winner)")
    few_shot: int = Field(3, gt=0, description="training examples put before the prompt in the few-shot and "
                                               "retrieval arms (fewer when they do not fit eval.max_prompt_tokens)")
    retrieval_pool: int = Field(10_000, gt=0, description=(
        "training examples the retrieval arm searches (BM25 over their prompts; the first ones read)"))
    max_prompt_tokens: int | None = Field(None, gt=0, description=(
        "the prompting arms' context: default the base model's (max_position_embeddings), not model.max_seq_len"))
    price_per_million_tokens: float | None = Field(None, gt=0, description=(
        "price of a token sent or generated, for the cost of 1,000 requests per arm; default: cost relative to "
        "the variant's"))
    metric: Literal["loss", "exact_match", "chrf", "format", "preference", "reward"] = Field("loss", description=(
        "what the verdict compares: loss on the target tokens (all examples), exact match, chrF or "
        "format adherence of the generations, (preference pairs) how often the chosen answer is "
        "likelier per token than the rejected one, or (objective grpo) the run's grpo.rewards of the generations"))
    num_generations: int = Field(16, ge=0, description="held-out examples (the first ones) each arm answers greedily")
    max_new_tokens: int = Field(128, gt=0, description="longest generated answer")
    format_regex: str | None = Field(None, description="an answer is in format when the regex matches all of it "
                                                       "(re.fullmatch on the stripped answer)")
    max_examples: int | None = Field(None, gt=0, description="score at most this many held-out examples (default all)")
    bootstrap_samples: int = Field(1000, ge=100, description="paired bootstrap resamples for the 95% interval")
    seed: int = 0
    batch_size: int = Field(8, gt=0, description="examples per forward pass in a model actor")
    num_actors: int = Field(2, gt=0, description="model actors scoring in parallel, one model copy each "
                                                 "(one GPU each with distributed.use_gpu)")

    @field_validator("format_regex")
    @classmethod
    def _compiles(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                re.compile(value)
            except re.error as e:
                raise ValueError(f"not a valid regular expression: {e}") from e
        return value

    @model_validator(mode="after")
    def _metric_needs(self) -> "EvalConfig":
        if self.metric == "format" and not self.format_regex:
            raise ValueError("metric format needs eval.format_regex")
        if self.metric not in ("loss", "preference") and self.num_generations == 0:
            raise ValueError(f"metric {self.metric} is measured on generations: set eval.num_generations > 0")
        return self


class PreferenceConfig(Section):
    """Settings of the preference objectives (objective: dpo | orpo | simpo | kto | reward_model)."""

    beta: float = Field(0.1, gt=0, description=(
        "dpo/kto: how far the variant may move from the reference model (higher: less); "
        "orpo: the weight of the odds-ratio term beside the chosen answers' next-token loss; "
        "simpo: the scale of the mean log-prob margin (default 2.0 there; 2-10 in its paper)"))
    simpo_gamma: float = Field(0.5, ge=0, description=(
        "simpo: the margin the chosen answer's scaled mean log-prob must clear over the rejected one's "
        "(TRL's simpo_gamma)"))
    reference: Literal["precomputed", "inline"] = Field("precomputed", description=(
        "dpo/kto: precomputed: the base model's log-probs of every answer, once, before training (with the "
        "prepared data when there is some): the workers hold no reference model; inline: each step, from the "
        "model with its adapter off (lora/qlora) or a frozen copy of the base (full)"))
    loss_type: Literal["sigmoid", "ipo", "hinge"] = Field("sigmoid", description=(
        "dpo: sigmoid (DPO's own); ipo: (margin - 1/(2 beta))^2 on mean log-probs per token (IPO); hinge: "
        "max(0, 1 - beta x margin) (SLiC)"))
    label_smoothing: float = Field(0.0, ge=0, lt=0.5, description=(
        "dpo sigmoid: the share of pairs assumed mislabelled (cDPO): the loss also pulls the other way by this much"))
    chosen_nll_weight: float = Field(0.0, ge=0, description=(
        "dpo: add this times the chosen answers' next-token loss (RPO, TRL's rpo_alpha; 1.0 in its paper): "
        "keeps the chosen answers likely, not only likelier than the rejected ones"))
    desirable_weight: float = Field(1.0, gt=0, description="kto: weight of the loss on answers labelled good")
    undesirable_weight: float = Field(1.0, gt=0, description="kto: weight of the loss on answers labelled bad")
    center_rewards_coefficient: float = Field(0.0, ge=0, description=(
        "reward_model: add this times the mean squared score sum of a pair (TRL's center_rewards_coefficient, "
        "0.01 in its docs): keeps the scores near 0"))


BUILTIN_REWARDS = ("chrf", "exact", "format")
REWARD_FUNCTION = r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$"  # module:function
REWARD_MODEL_PREFIX = "model:"  # a grpo.rewards key naming a reward model (ft_ray.evaluation.reward_model)
REWARD_MODEL = r"^model:\S+$"  # model:<folder, hub id or s3:// folder>


class GrpoConfig(Section):
    """Settings of objective grpo: answers sampled from the model in training, scored by rewards."""

    num_generations: int = Field(4, ge=2, description=(
        "answers sampled per prompt (a group): each answer's advantage is its reward against the group's"))
    max_new_tokens: int = Field(64, gt=0, description="longest sampled answer")
    temperature: float = Field(1.0, gt=0, description="sampling temperature of the answers")
    rewards: dict[str, float] = Field(
        default_factory=lambda: {"chrf": 1.0}, min_length=1, description=(
            "reward -> weight, summed: chrf (character n-gram F-score against the record's answer, 0-1), "
            "exact (1 when the answer equals the record's, up to whitespace), format (1 when grpo.format_regex "
            "matches the whole answer, as eval.format_regex), or module:function, your own: called as "
            "function(answer, reference, prompt) -> float on each worker (a module of the job's folder or an "
            "installed package), or, where it takes `completions` (TRL's reward functions), once per batch as "
            "function(prompts=[...], completions=[...], reference=[...]) -> a number or None per completion; or "
            "model:<folder, hub id or s3:// folder>, a reward model (a sequence classifier with one score) scoring "
            "prompt + answer, loaded by each worker"))
    format_regex: str | None = Field(None, description="the pattern reward `format` matches whole answers against, "
                                                       "e.g. '(?s)Hi .*'")
    beta: float = Field(0.0, ge=0, description=(
        "weight of the per-token KL estimate to the reference model (the adapter off, or a frozen copy of the "
        "base); 0 (TRL's default): none, and no reference forward"))
    scale_rewards: Literal["group", "none"] = Field("group", description=(
        "an answer's advantage is its reward minus its group's mean, over the group's standard deviation (group, "
        "GRPO's) or not scaled (none: Dr. GRPO's, which finds the scaling biased toward easy and hard prompts)"))
    loss_type: Literal["dapo", "bnpo", "grpo", "dr_grpo"] = Field("dapo", description=(
        "what the loss averages over (TRL's names): dapo = every trained answer token of the step, on every "
        "worker and micro batch, counts the same; bnpo = each micro batch's answer tokens, micro batches the "
        "same; grpo = each answer's tokens, then every answer the same (GRPO's paper: short answers weigh "
        "more per token); dr_grpo = the tokens' sum over answers x grpo.max_new_tokens (Dr. GRPO: no length "
        "bias)"))
    mask_truncated_answers: bool = Field(False, description=(
        "answers cut at grpo.max_new_tokens (no end of text) do not train (DAPO's overlong filtering)"))
    num_iterations: int = Field(1, ge=1, description=(
        "updates per sampled batch (TRL's num_iterations, GRPO's mu): a step's batches train this many steps in a "
        "row on the same answers, each update's token ratio to the policy that sampled them clipped by "
        "grpo.epsilon; train.max_steps, eval_every and checkpoint_every are then multiples of it"))
    epsilon: float = Field(0.2, gt=0, lt=1, description=(
        "PPO's clip: a sampled token's probability ratio (now / when sampled) counts within [1 - epsilon, "
        "1 + epsilon_high]; acts only with num_iterations above 1"))
    epsilon_high: float | None = Field(None, gt=0, description=(
        "the upper clip (DAPO's clip-higher, e.g. 0.28); default grpo.epsilon"))

    @model_validator(mode="after")
    def _regex(self) -> "GrpoConfig":
        for name in self.rewards:
            if name not in BUILTIN_REWARDS and not re.match(REWARD_FUNCTION, name) and not re.match(REWARD_MODEL, name):
                raise ValueError(f"grpo.rewards: {name!r} is neither {', '.join(BUILTIN_REWARDS)} nor module:function "
                                 "(e.g. my_rewards:has_answer) nor model:<folder, hub id or s3:// folder> (a reward "
                                 "model)")
        if "format" in self.rewards and not self.format_regex:
            raise ValueError("grpo.rewards: format needs grpo.format_regex")
        if self.format_regex:
            try:
                re.compile(self.format_regex)
            except re.error as e:
                raise ValueError(f"grpo.format_regex: not a regular expression ({e})") from None
        return self


class DistillConfig(Section):
    """Settings of objective distill: the student learns a teacher model's next-token
    distribution at each token it trains on (`ft_ray.train.distillation`)."""

    teacher: str | None = Field(None, description=(
        "the teacher: a causal LM's folder, hub id or s3:// folder (read with the storage section) with the "
        "model's tokenizer (another tokenizer: divergence uld), loaded whole by every worker (under fsdp and "
        "ZeRO-3 sharded across them as the model is), frozen, in the compute dtype (4-bit under qlora)"))
    divergence: Literal["forward_kl", "reverse_kl", "jsd", "uld"] = Field("forward_kl", description=(
        "per token, between the teacher's distribution p and the student's q: forward_kl = KL(p || q), "
        "classic distillation (q covers all of p); reverse_kl = KL(q || p) (q settles on p's likeliest "
        "tokens, MiniLLM); jsd = distill.jsd_beta x KL(p || m) + (1 - jsd_beta) x KL(q || m), m their "
        "mixture (GKD's generalized JSD, TRL's GKDTrainer); uld = the L1 distance of p and q each sorted from "
        "the likeliest token down (universal logit distillation), for a teacher with another tokenizer: it reads "
        "the same text in its own tokens, a trained token matched with the teacher's that starts at the same place "
        "of the text (both predicted after the same text)"))
    uld_shared_tokens: bool = Field(True, description=(
        "uld: the tokens of the same text in both vocabularies (and the two bos and eos) are compared with each "
        "other, |q - p| token by token, and only the others sorted (GOLD's hybrid: where the vocabularies overlap "
        "the model learns which token the teacher prefers, not only how sure it is); false: all sorted (plain "
        "ULD)"))
    jsd_beta: float = Field(0.5, gt=0, lt=1, description="jsd: the teacher's share of the mixture m (TRL's beta)")
    temperature: float = Field(1.0, gt=0, description=(
        "both models' logits are divided by it before the divergence, which is then multiplied by its square "
        "(Hinton et al.: the gradients keep their size); above 1 the teacher's less likely tokens count more"))
    ratio: float = Field(0.5, ge=0, le=1, description=(
        "the loss is ratio x the divergence + (1 - ratio) x the next-token loss on the records' tokens; "
        "1: the teacher alone (GKD's), 0.5: half each (torchtune's kd_ratio)"))
    on_policy: float = Field(0.0, ge=0, le=1, description=(
        "the share of training batches whose answers the model samples itself to the records' prompts, the teacher "
        "then grading each of their tokens (GKD's lmbda; on-policy distillation): those batches train on the "
        "divergence alone; needs one record per row (data.pack: false, its default then)"))
    max_new_tokens: int = Field(128, gt=0, description="on_policy: the longest sampled answer")
    sampling_temperature: float = Field(1.0, gt=0, description="on_policy: the temperature answers are sampled at")
    teacher_logits: Literal["inline", "precomputed"] = Field("inline", description=(
        "inline: every worker loads the teacher and runs it on each batch; precomputed: model actors run it once "
        "over the packed data before training (`ft-ray prepare` stores the result with the prepared data) and keep "
        "its distill.top_k likeliest tokens' logits at each trained token, so the workers hold no teacher and a "
        "sweep's trials or a later epoch never run it again (forward_kl, the teacher's distribution taken over "
        "those tokens, or uld; no on_policy)"))
    top_k: int = Field(32, ge=1, description=(
        "teacher_logits precomputed: the teacher's likeliest tokens kept at each trained token (6 bytes each per "
        "token in storage)"))


# the data formats each objective trains on
OBJECTIVE_FORMATS = {"sft": ("text", "instruction", "chat", "completion", "segments"),
                     "distill": ("text", "instruction", "chat", "completion", "segments"), "dpo": ("preference",),
                     "orpo": ("preference",), "simpo": ("preference",), "kto": ("kto",),
                     "grpo": ("instruction", "chat", "completion"), "reward_model": ("preference",)}
PAIRED_OBJECTIVES = ("dpo", "orpo", "simpo")  # trained on chosen/rejected pairs
SIMPO_BETA = 2.0  # preference.beta for simpo when the job sets none (SimPO's paper: 2 to 10)


class JobConfig(Section):
    run_name: str = Field("ft-ray-run", pattern=FOLDER_NAME)
    method: Literal["full", "lora", "qlora"] = "lora"
    objective: Literal["sft", "distill", "dpo", "orpo", "simpo", "kto", "grpo", "reward_model"] = Field(
        "sft", description=(
        "sft: next-token loss on the answers; distill: a teacher model's next-token distributions on the "
        "answers (distill.teacher), beside their next-token loss; dpo/orpo/simpo: pairs of a chosen and a rejected answer "
        "(format preference; orpo and simpo need no reference model); kto: answers labelled good or bad "
        "(format kto); grpo: answers sampled from the model to the records' prompts, scored by grpo.rewards "
        "against the records' answers; reward_model: a sequence classifier with one score trained to score the "
        "chosen answer above the rejected one (format preference), a reward for grpo (model:<its folder>)"))
    preference: PreferenceConfig = Field(default_factory=PreferenceConfig)
    grpo: GrpoConfig = Field(default_factory=GrpoConfig)
    distill: DistillConfig = Field(default_factory=DistillConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig
    lora: LoraConfig = Field(default_factory=LoraConfig)
    quantization: QuantizationConfig = Field(default_factory=QuantizationConfig)
    distributed: DistributedConfig = Field(default_factory=DistributedConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    storage: StorageConfig = Field(default_factory=StorageConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    tune: TuneConfig | None = None
    export: ExportConfig = Field(default_factory=ExportConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)

    @property
    def zero3(self) -> bool:
        """DeepSpeed ZeRO-3: each worker holds a shard of the weights, gathered layer by layer."""
        return self.distributed.strategy == "deepspeed" and self.distributed.deepspeed.stage == 3

    @property
    def loads_on_rank0(self) -> bool:
        """`distributed.fsdp.cpu_ram_efficient_loading` applies: an fsdp job whose model the
        other workers can build empty and take from rank 0 (`fsdp_engine.shard_model`), LoRA's
        weights too (a continued adapter's, those drawn or decomposed from the weights by rank 0):
        not under QLoRA's 4-bit layers, which cannot be built empty."""
        dist = self.distributed
        return dist.strategy == "fsdp" and dist.fsdp.cpu_ram_efficient_loading and self.method != "qlora"

    @property
    def partitions_at_load(self) -> bool:
        """`distributed.deepspeed.zero3_init` applies: a ZeRO-3 job whose models are built
        partitioned, rank 0 alone reading their weights (`deepspeed_engine.partitioned_at_load`),
        but QLoRA's (bitsandbytes' 4-bit layers). What reads whole weights once the model is
        built gathers them: ft-ray's mended token rows, and PEFT while the config lives on (a
        continued adapter, DoRA's norms, LoRA initialised from the weights, the modules and
        token rows it copies to train)."""
        return self.zero3 and self.distributed.deepspeed.zero3_init and self.method != "qlora"

    @property
    def sharded_weights(self) -> bool:
        """Each worker holds a shard of the weights, gathered layer by layer (fsdp, ZeRO-3): every
        forward is a collective, which every worker runs as many times."""
        return self.distributed.strategy == "fsdp" or self.zero3

    @property
    def uses_fast_paths(self) -> bool:
        """ft-ray's own forwards (`train.fast_paths`: the LM head in chunks, the fused LoRA
        layers) replace the modules': `train.fused_kernels` is not none, and each worker holds
        whole weights (ZeRO-3 gathers a module's weights only inside the module's own forward)."""
        return self.train.fused_kernels != "none" and not self.zero3

    @property
    def fuses_lora(self) -> bool:
        """An adapter's LoRA layers run ft-ray's fused forward (`fast_paths.fuse_lora_layers`), the
        trained model's and its reference's alike: on the fast paths, but not DoRA's (it rescales
        the whole output: PEFT's forward)."""
        return self.uses_fast_paths and not self.lora.use_dora

    @property
    def recomputes_swiglu(self) -> bool:
        """`train.recompute_swiglu` applies: a full fine-tune whose workers hold whole weights
        (ZeRO-3 gathers down_proj's weight only inside down_proj's own forward)."""
        return self.method == "full" and self.train.recompute_swiglu and not self.zero3

    @property
    def trains_adapter(self) -> bool:
        """LoRA and QLoRA train (and export) an adapter; a full fine-tune the whole model."""
        return self.method in ("lora", "qlora")

    @property
    def rounds(self) -> int:
        """Optimizer steps each step's batches train in a row (grpo.num_iterations; 1 otherwise)."""
        return self.grpo.num_iterations if self.objective == "grpo" else 1

    @property
    def shuffle_seed(self) -> int:
        """The seed of the data's order: data.shuffle_seed, else train.seed."""
        return self.data.shuffle_seed if self.data.shuffle_seed is not None else self.train.seed

    @property
    def carries_roles(self) -> bool:
        """Preference data: each token of a packed row says whose it is (prompt, chosen, rejected)."""
        return self.objective in ("dpo", "orpo", "simpo", "kto", "reward_model")

    @property
    def scores(self) -> bool:
        """The model is a sequence classifier with one score (a reward model), not a causal LM."""
        return self.objective == "reward_model"

    @property
    def precomputes_reference(self) -> bool:
        """DPO/KTO with `preference.reference: precomputed`: reference log-probs come with the data."""
        return self.objective in ("dpo", "kto") and self.preference.reference == "precomputed"

    @property
    def precomputes_teacher(self) -> bool:
        """distill with `distill.teacher_logits: precomputed`: the teacher's top-k logits come with the data."""
        return self.objective == "distill" and self.distill.teacher_logits == "precomputed"

    @property
    def precomputes(self) -> bool:
        """A frozen model's columns are computed over the packed data before training."""
        return self.precomputes_reference or self.precomputes_teacher

    @property
    def teacher(self) -> ModelConfig:
        """objective distill: the teacher as a model section: `distill.teacher`, read with the
        job's storage section, at the student's sequence length and attention, its code run
        only where the student's is."""
        teacher = ModelConfig(name_or_path=self.distill.teacher or "", max_seq_len=self.model.max_seq_len,
                              trust_remote_code=self.model.trust_remote_code,
                              attn_implementation=self.model.attn_implementation)
        teacher.use_storage(self.storage)
        return teacher

    @property
    def drop_over(self) -> int | None:
        """Records longer than this many tokens are rejected (`data.overlong: drop`), or None."""
        return (self.data.max_record_tokens or self.model.max_seq_len) if self.data.overlong == "drop" else None

    @model_validator(mode="after")
    def _objective_defaults(self) -> "JobConfig":
        if self.objective == "simpo" and "beta" not in self.preference.model_fields_set:
            self.preference.beta = SIMPO_BETA  # DPO's 0.1 would barely move SimPO's length-normalised margin
        samples = self.objective == "grpo" or (self.objective == "distill" and self.distill.on_policy > 0)
        if samples and "pack" not in self.data.model_fields_set:
            self.data.pack = False  # one prompt per row, as the model is asked it
        return self

    @model_validator(mode="after")
    def _model_reads_storage(self) -> "JobConfig":
        self.model.use_storage(self.storage)
        return self

    @model_validator(mode="after")
    def _check_combinations(self) -> "JobConfig":
        problems = impossible_combinations(self)
        if problems:
            raise ValueError("; ".join(problems))
        return self


def impossible_combinations(job: JobConfig) -> list[str]:
    """Settings that cannot work together, each with the key to change."""
    problems = []
    dist, ds = job.distributed, job.distributed.deepspeed
    if job.train.precision == "fp16" and not dist.use_gpu:
        problems.append("train.precision: fp16 needs a GPU (distributed.use_gpu: true); use fp32 or bf16 on CPU")
    offloading = ds.offload_optimizer != "none" or ds.offload_params != "none"
    if offloading and dist.strategy != "deepspeed":
        problems.append("distributed.deepspeed.offload_*: CPU offload needs distributed.strategy: deepspeed")
    if dist.fsdp.offload != "none" and dist.strategy != "fsdp":
        problems.append("distributed.fsdp.offload: needs distributed.strategy: fsdp (DeepSpeed's: "
                        "distributed.deepspeed.offload_optimizer, offload_params)")
    if dist.fsdp.offload != "none" and dist.strategy == "fsdp" and job.method == "qlora":
        problems.append("distributed.fsdp.offload: 4-bit weights cannot be offloaded (bitsandbytes keeps their "
                        "quantization state on the GPU); use lora, or qlora without offload")
    if dist.elastic and dist.strategy == "deepspeed" and ds.stage > 0:
        problems.append(f"distributed.num_workers: an elastic range needs strategy ddp, fsdp or ZeRO stage 0; ZeRO-{ds.stage} "
                        "shards are tied to the worker count (set a fixed num_workers)")
    if job.train.optimizer == "adamw_8bit" and ds.offload_optimizer != "none" and dist.strategy == "deepspeed":
        problems.append("train.optimizer: adamw_8bit keeps its states on the GPU in 8 bits; "
                        "distributed.deepspeed.offload_optimizer moves fp32 states to the CPU, where DeepSpeed's CPU "
                        "AdamW steps them: use one or the other")
    if job.train.optimizer == "adamw_8bit" and dist.strategy == "fsdp":
        problems.append("train.optimizer: adamw_8bit runs with distributed.strategy ddp or deepspeed; fsdp shards "
                        "AdamW's states across the workers (bitsandbytes' 8-bit states do not shard)")
    if job.train.compile and dist.strategy == "fsdp":
        problems.append("train.compile: compiles the whole model's forward, around fsdp's per-layer gathers; "
                        "not with distributed.strategy fsdp")
    if ds.offload_params != "none" and ds.stage != 3:
        problems.append(f"distributed.deepspeed.offload_params: needs stage 3 (stage is {ds.stage})")
    if job.method == "qlora" and job.sharded_weights and job.quantization.quant_storage == "uint8":
        problems.append(f"quantization.quant_storage: qlora with {'ZeRO-3' if job.zero3 else 'fsdp'} needs a float storage "
                        "dtype (bnb_4bit_quant_storage), e.g. bfloat16, so the 4-bit weights can be sharded"
                        + ("; or use stage 2" if job.zero3 else ""))
    if job.method == "qlora" and dist.strategy == "deepspeed" and ds.offload_params != "none":
        problems.append("distributed.deepspeed.offload_params: 4-bit weights cannot be offloaded; use offload_optimizer")
    if job.data.text_stride >= job.model.max_seq_len // 2:
        problems.append(f"data.text_stride: {job.data.text_stride} tokens of overlap leave a window of "
                        f"model.max_seq_len={job.model.max_seq_len} too little new text; use less than half of it")
    if dist.gpu_share < 1 and dist.max_workers > 1:
        problems.append(f"distributed.gpus_per_worker: {dist.gpus_per_worker} shares GPUs, which only one-worker jobs "
                        "(sweep trials) can do: the workers of one job cannot talk over NCCL on one device")
    if job.eval.metric == "reward" and job.objective != "grpo":
        problems.append(f"eval.metric: reward scores generations with grpo.rewards (objective grpo), not objective "
                        f"{job.objective}")
    if job.eval.metric == "preference" and job.objective not in PAIRED_OBJECTIVES:
        problems.append(f"eval.metric: preference is measured on chosen/rejected pairs (objective dpo, orpo or simpo), "
                        f"not objective {job.objective}")
    preference = job.preference
    if job.objective != "dpo" and (preference.loss_type != "sigmoid" or preference.label_smoothing):
        problems.append(f"preference.loss_type / label_smoothing: variants of dpo's loss, not of objective "
                        f"{job.objective}")
    elif preference.label_smoothing and preference.loss_type != "sigmoid":
        problems.append(f"preference.label_smoothing: smooths the sigmoid loss; loss_type {preference.loss_type} "
                        "has none")
    if job.model.adapter and not job.trains_adapter:
        problems.append(f"model.adapter: continues a LoRA adapter (method lora or qlora), not method {job.method}; "
                        "for a full fine-tune of it, `ft-ray export RUN --merge --out FOLDER` and set "
                        "model.name_or_path: FOLDER")
    if job.model.adapter and job.scores:
        problems.append("model.adapter: a reward model trains a new score head on the base model; to start from an "
                        "adapter, `ft-ray export RUN --merge --out FOLDER` and set model.name_or_path: FOLDER")
    if job.lora.loraplus_lr_ratio != 1 and not job.trains_adapter:
        problems.append(f"lora.loraplus_lr_ratio: LoRA+ sets the learning rate of LoRA's B matrices; method {job.method} "
                        "trains none (use lora or qlora)")
    if job.objective == "grpo":
        if job.data.pack:
            problems.append("data.pack: objective grpo reads one prompt per row: set data.pack: false (its default "
                            "for grpo)")
        if job.train.compile:
            problems.append("train.compile: objective grpo generates with the model; compile is for sft and "
                            "preference runs")
        rounds = job.grpo.num_iterations
        for key in ("max_steps", "eval_every", "checkpoint_every"):
            value = getattr(job.train, key)
            if rounds > 1 and value is not None and value % rounds:
                problems.append(f"train.{key}: {value} is not a multiple of grpo.num_iterations ({rounds}): a step's "
                                f"answers train {rounds} steps in a row, and evaluations and checkpoints fall "
                                "between such rounds")
    if job.scores:
        if job.train.compare_generations:
            problems.append("train.compare_generations: a reward model generates no answers")
    elif job.preference.center_rewards_coefficient:
        problems.append(f"preference.center_rewards_coefficient: for objective reward_model, not {job.objective}")
    if job.objective == "distill":
        if not job.distill.teacher:
            problems.append("distill.teacher: objective distill learns from a teacher model: set its folder, hub id "
                            "or s3:// folder")
        if job.model.add_tokens:
            problems.append("model.add_tokens: the teacher has no such tokens to teach (distillation compares the "
                            "two models token by token over the same vocabulary)")
        if job.distill.on_policy and job.data.pack:
            problems.append("data.pack: on-policy distillation (distill.on_policy) samples answers to one prompt per "
                            "row: set data.pack: false (its default then)")
        if job.distill.on_policy and job.train.compile:
            problems.append("train.compile: on-policy distillation generates with the model; compile is for sft and "
                            "preference runs")
        if job.precomputes_teacher and job.distill.on_policy:
            problems.append("distill.on_policy: the teacher grades the model's own answers as it samples them, so "
                            "on-policy distillation needs distill.teacher_logits: inline")
        if job.precomputes_teacher and job.distill.divergence not in ("forward_kl", "uld"):
            problems.append(f"distill.divergence: {job.distill.divergence} needs the teacher's whole distribution; "
                            "its precomputed top-k logits (distill.teacher_logits: precomputed) serve forward_kl and uld")
    elif job.distill.teacher:
        problems.append(f"distill.teacher: read by objective distill, not {job.objective}")
    if job.train.neftune_alpha and job.objective != "sft":
        problems.append(f"train.neftune_alpha: noisy embeddings are for objective sft; objective {job.objective} "
                        "trains without them")
    if job.data.loss_on != "answers" and job.objective not in ("sft", "distill"):
        problems.append(f"data.loss_on: {job.data.loss_on} is for objective sft or distill; objective {job.objective} "
                        "trains on its answers")
    allowed = OBJECTIVE_FORMATS[job.objective]
    for source in job.data.all_sources() + ([job.data.eval_source()] if job.data.eval else []) + [
            source for _, _, source in job.data.eval_set_sources()]:
        if source.format not in ("auto", *allowed):
            problems.append(f"data.format: objective {job.objective} trains on format {' or '.join(allowed)}, "
                            f"not {source.format} (source {source.where})")
    return problems


def with_overrides(base: dict, overrides: dict[str, Any]) -> dict:
    """A copy of a job dict with dotted keys set; a section on the way that does not exist
    raises KeyError (a leaf that does not exist is left for the schema to reject)."""
    job = copy.deepcopy(base)
    for key, value in overrides.items():
        node, parts = job, key.split(".")
        for part in parts[:-1]:
            if not isinstance(node.get(part), dict):
                raise KeyError(key)
            node = node[part]
        node[parts[-1]] = value
    return job


def edge_values(spec: dict) -> list[Any]:
    """The values at the edges of a search-space entry ({grid|choice: [..]} all of them; a range its ends)."""
    kind, values = next(iter(spec.items()))
    if kind == "randint":
        return [values[0], values[1] - 1]
    return list(values)


def sweep_name(config: JobConfig) -> str:
    """The sweep's folder under storage.path and its W&B group: tune.name, else run_name."""
    return (config.tune and config.tune.name) or config.run_name


# ---------------------------------------------------------------- loading


def load_config(path: str | Path, overrides: list[str] | None = None) -> JobConfig:
    """Read a job file, apply `a.b=c` overrides and validate.

    Raises:
        ConfigError: with one line per problem, each naming the file, line and key.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError([f"{path}: cannot read: {e.strerror}"]) from None
    try:
        raw = yaml.safe_load(text) or {}
        where = {key: f"{path}:{line}" for key, line in _key_lines(yaml.compose(text)).items()}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f"{path}:{mark.line + 1}" if mark else str(path)
        raise ConfigError([f"{at}: not valid YAML: {getattr(e, 'problem', e)}"]) from None
    if not isinstance(raw, dict):
        raise ConfigError([f"{path}: a job file is a mapping of sections (model, data, train, ...)"])
    for override in overrides or []:
        key = apply_override(raw, override)
        # a problem in what it set is said as the --set, not as the file's line it replaced
        where = {k: v for k, v in where.items() if k[:len(key)] != key} | {key: f"--set {override}"}
    return resolve_paths(config_from_dict(raw, source=str(path), where=where))


def config_from_dict(raw: dict, source: str = "<config>", where: dict | None = None) -> JobConfig:
    """The validated job; `where` maps key paths to where they were set ("job.yaml:12", "--set ...")."""
    try:
        return JobConfig.model_validate(raw)
    except ValidationError as e:
        raise ConfigError([_describe(err, source, where or {}) for err in e.errors()]) from None


def apply_override(raw: dict, override: str) -> tuple[str, ...]:
    """Apply one `--set a.b.c=value` (the value parsed as YAML: numbers, lists, bools); returns
    the key path it set."""
    key, sep, value = override.partition("=")
    if not sep or not key.strip():
        raise ConfigError([f"--set {override}: expected key=value, e.g. train.learning_rate=3e-4"])
    node = raw
    parts = key.strip().split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError([f"--set {override}: '{part}' is a value, not a section"])
        node = child
    node[parts[-1]] = parse_scalar(value)
    return tuple(parts)


def parse_scalar(value: str) -> Any:
    """YAML parsing plus the float forms YAML 1.1 misses (`3e-4`)."""
    try:
        parsed = yaml.safe_load(value)
    except yaml.YAMLError:
        return value
    if isinstance(parsed, str):
        try:
            return float(parsed)
        except ValueError:
            return parsed
    return parsed


def resolve_paths(config: JobConfig) -> JobConfig:
    """Make local paths absolute (relative ones are read from the current directory), so
    Ray tasks and workers, which run elsewhere, read the same files."""
    if config.data.train:
        config.data.train = _absolute(config.data.train)
    config.data.eval_sets = {name: source if isinstance(source, SourceConfig) else _absolute(source)
                             for name, source in config.data.eval_sets.items()}
    for source in config.data.sources + [s for s in [config.data.eval, *config.data.eval_sets.values()]
                                         if isinstance(s, SourceConfig)]:
        if source.path:
            source.path = _absolute(source.path)
        elif source.hf.startswith((".", "/", "~")) or Path(source.hf).expanduser().is_dir():
            source.hf = _absolute(source.hf)  # a local dataset repository folder
    if config.data.prepared:
        config.data.prepared = _absolute(config.data.prepared)
    if isinstance(config.data.eval, str):
        config.data.eval = _absolute(config.data.eval)
    config.storage.path = _absolute(config.storage.path)
    # model folders (a hub id, a built-in or an s3:// model is left as it is)
    config.model.name_or_path = _absolute_folder(config.model.name_or_path)
    if config.model.adapter:
        config.model.adapter = _absolute_folder(config.model.adapter)
    if config.distill.teacher:
        config.distill.teacher = _absolute_folder(config.distill.teacher)
    config.grpo.rewards = {REWARD_MODEL_PREFIX + _absolute_folder(name[len(REWARD_MODEL_PREFIX):])
                           if name.startswith(REWARD_MODEL_PREFIX) else name: weight
                           for name, weight in config.grpo.rewards.items()}
    return config


def _absolute(path: str) -> str:
    return path if "://" in path else str(Path(path).expanduser().absolute())


def _absolute_folder(name: str) -> str:
    """A model named by a local folder (a path, or a folder that is here) as an absolute path;
    a hub id, a built-in or an s3:// model unchanged."""
    local = name.startswith(("./", "../", "/", "~")) or Path(name).expanduser().is_dir()
    return _absolute(name) if local and "://" not in name and not name.startswith("builtin:") else name


def dump_yaml(config: JobConfig) -> str:
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)


# Keys a relaunch may change and still resume the same run: where and how it runs, and how long
# (extending max_steps/epochs continues the run; the schedule stretches to the new length; more
# patience, or none, continues a run early stopping ended).
RESUMABLE_KEYS = ("run_name", "train.max_steps", "train.epochs", "train.eval_every", "train.checkpoint_every",
                  "train.early_stopping_",
                  "distributed.num_workers", "distributed.use_gpu", "distributed.cpus_per_worker", "distributed.gpus_per_worker",
                  "distributed.placement_strategy", "distributed.max_failures", "distributed.timeout_s", "distributed.fsdp.",
                  "storage.", "tracking.", "tune", "export.", "train.keep_checkpoints", "train.log_every",
                  "train.compare_generations", "train.peak_tflops", "data.prepared", "eval.",
                  "train.fused_kernels", "train.fp32_residual", "train.recompute_swiglu", "train.compile", "train.fused_optimizer", "train.prefetch_batches")


def resume_changes(old: dict, new: dict) -> list[str]:
    """The keys whose values differ between the config a run started with and a relaunch's,
    except those a resume may change (`RESUMABLE_KEYS`), as "key: old -> new" lines."""
    flat_old, flat_new = _flatten(with_defaults(old)), _flatten(new)
    changes = []
    for key in sorted(set(flat_old) | set(flat_new)):
        if key.startswith(RESUMABLE_KEYS) or flat_old.get(key) == flat_new.get(key):
            continue
        changes.append(f"{key}: {flat_old.get(key)!r} -> {flat_new.get(key)!r}")
    return changes


# settings whose default changed what a run does when they came: a run saved without one ran as the
# value here, where the test on its section says the setting mattered to it
LEGACY_DEFAULTS = {("model", "untrained_tokens"): ("keep", lambda model: True),
                   ("model", "new_tokens"): ("whole", lambda model: bool(model.get("add_tokens")))}


def with_defaults(saved: dict) -> dict:
    """A saved job with the keys it lacks at their defaults: a run started by an ft-ray that
    had no such setting yet ran as the default does, or as `LEGACY_DEFAULTS` says where the
    default does otherwise (a job that no longer validates: as saved)."""
    saved = copy.deepcopy(saved)
    for (section, key), (value, mattered) in LEGACY_DEFAULTS.items():
        if isinstance(saved.get(section), dict) and mattered(saved[section]):
            saved[section].setdefault(key, value)
    try:
        return JobConfig.model_validate(saved).model_dump(mode="json")
    except ValidationError:
        return saved


def _flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


# ---------------------------------------------------------------- errors


def _describe(err: dict, source: str, where_set: dict) -> str:
    loc = tuple(str(p) for p in err["loc"])
    kind, ctx = err["type"], err.get("ctx") or {}
    # the key's own place, else that of the nearest section holding it that a --set replaced, else the
    # --set that made it (an unknown section: `--set trian.max_steps=3`)
    overrides = [(key, at) for key, at in where_set.items() if at.startswith("--set ")]
    made = [at for n in range(len(loc) - 1, 0, -1) for key, at in overrides if key == loc[:n]]
    made += [at for key, at in overrides if key[:len(loc)] == loc]
    where = where_set.get(loc) or (made[0] if made else source)
    dotted = ".".join(loc)
    if kind == "extra_forbidden":
        hint = _did_you_mean(loc)
        return f"{where}: unknown key '{dotted}'{hint}"
    if kind == "missing":
        return f"{where}: {dotted}: required key is missing"
    messages = {
        "greater_than": "must be > {gt}",
        "greater_than_equal": "must be >= {ge}",
        "less_than": "must be < {lt}",
        "less_than_equal": "must be <= {le}",
        "literal_error": "must be one of {expected}, got {input!r}",
        "string_pattern_mismatch": "must match {pattern} (letters, digits, . _ -), got {input!r}",
    }
    template = messages.get(kind)
    shown = {k: int(v) if isinstance(v, float) and v.is_integer() else v for k, v in ctx.items()}
    message = template.format(**shown, input=err.get("input")) if template else err["msg"]
    if kind == "value_error":
        message = str(ctx.get("error", err["msg"]))
        return f"{where}: {dotted}: {message}" if dotted else f"{where}: {message}"
    return f"{where}: {dotted}: {message}"


# what transformers/TRL, PEFT, Axolotl and LLaMA-Factory call a setting, and ft-ray's key for it
PEER_NAMES = {
    "lr": "train.learning_rate", "learning_rate": "train.learning_rate", "num_epochs": "train.epochs",
    "num_train_epochs": "train.epochs", "batch_size": "train.micro_batch_size",
    "per_device_train_batch_size": "train.micro_batch_size", "gradient_accumulation_steps": "train.gradient_accumulation",
    "warmup_steps": "train.warmup_steps", "warmup_ratio": "train.warmup_steps",
    "lr_scheduler_type": "train.lr_schedule", "lr_scheduler": "train.lr_schedule",
    "cosine_min_lr_ratio": "train.min_lr_ratio", "neftune_noise_alpha": "train.neftune_alpha",
    "eval_steps": "train.eval_every", "save_steps": "train.checkpoint_every",
    "save_total_limit": "train.keep_checkpoints", "logging_steps": "train.log_every", "bf16": "train.precision",
    "early_stopping_patience": "train.early_stopping_patience",
    "early_stopping_threshold": "train.early_stopping_min_delta", "loss_type": "preference.loss_type",
    "fp16": "train.precision", "lora_r": "lora.rank", "r": "lora.rank", "lora_rank": "lora.rank",
    "lora_alpha": "lora.alpha", "lora_dropout": "lora.dropout", "lora_target": "lora.target_modules",
    "lora_target_modules": "lora.target_modules", "base_model": "model.name_or_path",
    "model_name_or_path": "model.name_or_path", "sequence_len": "model.max_seq_len", "cutoff_len": "model.max_seq_len",
    "max_seq_length": "model.max_seq_len", "max_length": "model.max_seq_len", "load_in_4bit": "method: qlora",
    "finetuning_type": "method", "adapter": "method", "dataset": "data.train", "datasets": "data.sources",
    "val_set_size": "data.eval_fraction", "output_dir": "storage.path", "deepspeed": "distributed.deepspeed.stage",
    "wandb_project": "tracking.wandb.project", "report_to": "tracking.wandb.mode",
    "train_on_inputs": "data.loss_on: all", "train_on_prompt": "data.loss_on: all",
    "mask_history": "data.loss_on: last_answer", "completion_only_loss": "data.loss_on",
    "assistant_only_loss": "data.loss_on", "loraplus_lr_ratio": "lora.loraplus_lr_ratio",
    "num_generations": "grpo.num_generations", "max_completion_length": "grpo.max_new_tokens",
    "num_iterations": "grpo.num_iterations", "epsilon": "grpo.epsilon", "epsilon_high": "grpo.epsilon_high",
    "optim": "train.optimizer", "optimizer": "train.optimizer", "fsdp": "distributed.strategy: fsdp",
    "fsdp_config": "distributed.fsdp", "fsdp_reshard_after_forward": "distributed.fsdp.reshard_after_forward",
    "fsdp_offload_params": "distributed.fsdp.offload", "fsdp_cpu_offload": "distributed.fsdp.offload",
    "cpu_offload": "distributed.fsdp.offload",
    "fsdp_cpu_ram_efficient_loading": "distributed.fsdp.cpu_ram_efficient_loading",
    "zero3_init_flag": "distributed.deepspeed.zero3_init",
}


def _did_you_mean(loc: tuple[str, ...]) -> str:
    """A key of the same section spelled alike, else ft-ray's key for a peer tool's name."""
    if loc[-1] in PEER_NAMES and PEER_NAMES[loc[-1]] != ".".join(loc):
        return f" (ft-ray's key: '{PEER_NAMES[loc[-1]]}')"
    model: type[BaseModel] = JobConfig
    for part in loc[:-1]:
        field = model.model_fields.get(part)
        annotation = getattr(field, "annotation", None)
        candidates = [a for a in (annotation, *getattr(annotation, "__args__", ())) if isinstance(a, type)]
        sections = [a for a in candidates if issubclass(a, BaseModel)]
        if not sections:
            return ""
        model = sections[0]
    close = difflib.get_close_matches(loc[-1], list(model.model_fields), n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _key_lines(node: yaml.Node | None, prefix: tuple = ()) -> dict[tuple, int]:
    """Map each key path of a YAML document to its 1-based line number."""
    lines: dict[tuple, int] = {}
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            path = (*prefix, str(key_node.value))
            lines[path] = key_node.start_mark.line + 1
            lines.update(_key_lines(value_node, path))
    return lines

