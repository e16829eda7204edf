"""The FSDP2 engine without Ray, in one process (a gloo group of one) and for GRPO on two
spawned ranks (beside ZeRO-3, which shards as FSDP does): the same steps as the DDP engine,
its checkpoint, and the settings it refuses; 8-bit AdamW under ZeRO; on two spawned ranks, the
weights read by rank 0 alone (`distributed.fsdp.cpu_ram_efficient_loading`, ZeRO-3's `zero3_init`). Two Ray
workers: `tests/integration/test_strategies.py`."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from ft_ray.config import ConfigError, config_from_dict
from ft_ray.train.engines import DDPEngine, build_engine
from ft_ray.train.fsdp_engine import FSDPEngine
from ft_ray.train.modeling import build_model
from ft_ray.train.objectives import build_objective
from ft_ray.train.trainer import free_port


@pytest.fixture(scope="module")
def process_group():
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def job(strategy: str, method: str, precision: str, objective: str = "sft", reference: str = "precomputed",
        offload: str = "none", distill: dict | None = None, **train):
    fsdp = {"fsdp": {"offload": offload}} if strategy == "fsdp" else {}
    return config_from_dict({"method": method, "objective": objective, "data": {"train": "t.jsonl"},
                             **({"distill": distill} if distill else {}),
                             "distributed": {"strategy": strategy, **fsdp}, "lora": {"dropout": 0.0},
                             "quantization": {"quant_storage": "bfloat16"},  # qlora's, to be sharded
                             "preference": {"reference": reference},
                             "train": {"precision": precision, "learning_rate": 1e-3, "warmup_steps": 0, **train}})


def engine_of(config):
    """The job's engine over the built-in model, LoRA initialised alike in every call."""
    torch.manual_seed(1)
    model = build_model(config, "builtin:tiny-llama")
    return build_engine(model, config, total_steps=10, objective=build_objective(config, model))


def steps(engine, batch, count: int) -> list[float]:
    """Each step's loss and gradient norm."""
    seen = []
    for _ in range(count):
        seen.append(engine.micro_step(batch, 1.0, True)[0])
        seen.append(engine.step())
    return seen


@pytest.mark.parametrize("method, precision, checkpointing, offload", [
    ("full", "fp32", False, "none"), ("lora", "bf16", True, "cpu"), ("qlora", "bf16", False, "none")])
def test_fsdp_takes_the_steps_ddp_takes_and_resumes_exactly_from_its_shards(process_group, tmp_path, method,
                                                                             precision, checkpointing, offload):
    """A full fine-tune in fp32, LoRA over a bf16 base with gradient checkpointing, its shards
    offloaded (distributed.fsdp.offload: cpu), and QLoRA (its 4-bit weights stored in bf16) in
    bf16, all with the fused paths: the losses and gradient norms of three steps are DDP's; the
    checkpoint holds DCP shards (for LoRA and QLoRA the adapters only: the base is where the
    run started) beside the HF/PEFT weights; loaded into a new engine, the next step is the one
    the engine that went on took."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule

    torch.manual_seed(0)
    ids = torch.randint(3, 700, (4, 64))
    batch = {"input_ids": ids, "labels": ids, "position_ids": torch.arange(64).repeat(4, 1)}
    fsdp = engine_of(job("fsdp", method, precision, offload=offload, gradient_checkpointing=checkpointing))
    assert isinstance(fsdp, FSDPEngine)
    sharded = [m for m in fsdp.module.modules() if isinstance(m, FSDPModule)]
    assert sharded and all(isinstance(m._get_fsdp_state()._fsdp_param_group.offload_policy, CPUOffloadPolicy)
                           == (offload == "cpu") for m in sharded if m._get_fsdp_state()._fsdp_param_group)
    ddp = engine_of(job("ddp", method, precision, gradient_checkpointing=checkpointing))
    assert isinstance(ddp, DDPEngine)
    went = steps(fsdp, batch, 3)
    torch.testing.assert_close(went, steps(ddp, batch, 3), rtol=1e-6, atol=0)
    assert went[4] < went[0]  # the third step's loss, after two updates

    fsdp.save(tmp_path, rank=0)
    saved = dcp.FileSystemReader(str(tmp_path / "fsdp")).read_metadata().state_dict_metadata
    weights = [key for key in saved if key.startswith("model.")]
    assert (tmp_path / "fsdp" / "__0_0.distcp").is_file() and (tmp_path / "schedule.pt").is_file()
    if method != "full":
        assert weights and all("lora_" in key for key in weights)
        assert (tmp_path / "model" / "adapter_model.safetensors").is_file()
    else:
        assert len(weights) == sum(1 for _ in fsdp.module.parameters())
        assert (tmp_path / "model" / "model.safetensors").is_file()
    resumed = engine_of(job("fsdp", method, precision, offload=offload, gradient_checkpointing=checkpointing))
    resumed.load(tmp_path)
    assert resumed.lr == fsdp.lr
    assert steps(resumed, batch, 1) == steps(fsdp, batch, 1)
    for (name, went_on), back in zip(fsdp.module.named_parameters(), resumed.module.parameters()):
        if went_on.requires_grad:  # (QLoRA's packed 4-bit weights read as bf16 hold NaNs)
            torch.testing.assert_close(back.full_tensor(), went_on.full_tensor(), rtol=0, atol=0, msg=name)


def test_a_model_naming_no_layer_class_is_sharded_by_its_list_of_layers():
    """transformers' models name their decoder layer class (`_no_split_modules`); one that does
    not (remote code) is sharded by the items of its largest list of modules by weights: its
    layers, not a layer's longer list of experts."""
    from ft_ray.train.fsdp_engine import decoder_layers

    config = job("fsdp", "lora", "fp32")
    model = build_model(config, "builtin:tiny-llama")  # under PEFT's wrapper
    named = decoder_layers(model)
    assert [type(m).__name__ for m in named] == ["LlamaDecoderLayer"] * model.config.num_hidden_layers
    model.get_base_model()._no_split_modules = None
    assert decoder_layers(model) == named

    class Layer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.attention = torch.nn.Linear(64, 64)
            self.experts = torch.nn.ModuleList(torch.nn.Linear(64, 4) for _ in range(8))

    class Remote(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = torch.nn.ModuleList(Layer() for _ in range(3))

    remote = Remote()
    assert decoder_layers(remote) == list(remote.layers)


def two_pairs() -> dict[str, torch.Tensor]:
    """Two packed rows, each a chosen and a rejected answer after 8 prompt tokens."""
    from ft_ray.data.formats import CHOSEN, REJECTED

    torch.manual_seed(0)
    ids = torch.randint(3, 700, (2, 32))
    labels = ids.clone()
    labels[:, :8] = labels[:, 16:24] = -100
    return {"input_ids": ids, "labels": labels, "position_ids": torch.arange(16).repeat(2, 2),
            "roles": torch.tensor([CHOSEN] * 16 + [REJECTED] * 16).repeat(2, 1)}


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_an_inline_reference_in_bf16_starts_where_the_trained_model_does(process_group, strategy):
    """DPO of a full fine-tune in bf16: its inline reference (a frozen copy) runs the trained
    model's forward to the last bit, so every reward starts at 0 (the loss log 2): with the
    16-bit residual stream the trained model keeps, and under fsdp with its weights in bf16 but
    its buffers as they are (RoPE's frequencies in bf16 moved each log-prob: 0.678)."""
    engine = engine_of(job(strategy, "full", "bf16", objective="dpo", reference="inline"))
    assert steps(engine, two_pairs(), 1)[0] == pytest.approx(math.log(2), abs=1e-6)


@pytest.mark.parametrize("method, objective", [("lora", "reward_model"), ("full", "dpo")])
def test_pairs_train_as_under_ddp(process_group, method, objective):
    """A reward model, whose loss comes from its score head's output inside the forward (a
    hook), not from what the model returns: FSDP must keep the outer weights gathered into
    backward, where the head's gradient is taken (before, its storage was freed: an error).
    DPO of a full fine-tune with its inline reference, a frozen copy sharded as the policy is."""
    batch = two_pairs()
    fsdp, ddp = (engine_of(job(strategy, method, "fp32", objective=objective, reference="inline"))
                 for strategy in ("fsdp", "ddp"))
    went = steps(fsdp, batch, 3)
    torch.testing.assert_close(went, steps(ddp, batch, 3), rtol=1e-6, atol=0)
    assert went[4] < went[0]
    if objective == "dpo":
        assert all(hasattr(p, "full_tensor") for p in fsdp.objective.reference.model.parameters())  # sharded


@pytest.mark.parametrize("strategy, method, divergence", [
    ("fsdp", "lora", "forward_kl"), ("fsdp", "qlora", "forward_kl"), ("fsdp", "lora", "uld"),
    ("zero3", "full", "forward_kl")])
def test_distillation_from_a_sharded_teacher_takes_the_steps_of_a_whole_one(process_group, monkeypatch, tmp_path,
                                                                             strategy, method, divergence):
    """distill under fsdp and ZeRO-3: the teacher is sharded across the workers as the student
    is (each layer gathered for its forward, its outer weights too: its own forward, whole
    logits at the target tokens), not held whole by each; the steps are those of DDP, whose
    workers hold the whole teacher (one of the same tokenizer, in 4 bits under QLoRA, and for
    uld one of another)."""
    from tests.conftest import cross_tokenizer_llama, teacher_llama

    monkeypatch.setenv("LOCAL_RANK", "0")  # as Ray Train sets them, for DeepSpeed
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")

    teacher = (teacher_llama(tmp_path / "teacher", wider=True) if divergence == "forward_kl"
               else cross_tokenizer_llama(tmp_path / "teacher", permuted=False))
    torch.manual_seed(0)
    ids = torch.randint(3, 700, (2, 48))
    labels = ids.clone()
    labels[:, :16] = -100
    batch = {"input_ids": ids, "labels": labels, "position_ids": torch.arange(48).repeat(2, 1)}
    distill = {"objective": "distill", "distill": {"teacher": str(teacher), "divergence": divergence}}
    sharded = engine_of(job("fsdp", method, "fp32", **distill) if strategy == "fsdp" else config_from_dict({
        "method": method, "data": {"train": "t.jsonl"}, **distill, "distributed": {
            "strategy": "deepspeed", "num_workers": 1, "deepspeed": {"stage": 3}},
        "train": {"precision": "fp32", "learning_rate": 1e-3, "warmup_steps": 0}}))
    whole = engine_of(job("ddp", method, "fp32", **distill))
    taught = sharded.objective.teacher
    taught = getattr(taught, "teacher", taught)  # uld: the reader around it
    held = [p for p in taught.model.parameters()]
    assert taught.head is None and all(hasattr(p, "full_tensor") or hasattr(p, "ds_tensor") for p in held)
    went = steps(sharded, batch, 3)
    torch.testing.assert_close(went, steps(whole, batch, 3), rtol=1e-5, atol=0)
    assert went[4] < went[0]


def test_a_mixture_of_experts_adds_its_load_balancing_loss_as_under_ddp(process_group, tmp_path):
    """A full fine-tune of a tiny Qwen3-MoE, its routers' load-balancing loss added by the
    chunked head's forward (looked up in the module of the model's class, which FSDP
    subclasses: before, the lookup failed): DDP's steps."""
    from tests.conftest import tiny_moe

    folder = tiny_moe(tmp_path / "moe").name_or_path
    torch.manual_seed(0)
    ids = torch.randint(3, 700, (2, 32))
    batch = {"input_ids": ids, "labels": ids, "position_ids": torch.arange(32).repeat(2, 1)}
    taken = []
    for strategy in ("fsdp", "ddp"):
        config = config_from_dict({"method": "full", "model": {"name_or_path": folder}, "data": {"train": "t.jsonl"},
                                   "distributed": {"strategy": strategy}, "train": {"learning_rate": 1e-3}})
        torch.manual_seed(1)
        model = build_model(config, folder)
        taken.append(steps(build_engine(model, config, total_steps=10, objective=build_objective(config, model)),
                           batch, 2))
    torch.testing.assert_close(taken[0], taken[1], rtol=1e-6, atol=0)


@pytest.mark.parametrize("stage, precision", [(2, "fp32"), (3, "bf16")])
def test_8bit_adamw_under_zero_takes_ddp_s_steps_and_resumes_exactly_from_its_shards(process_group, monkeypatch,
                                                                                     tmp_path, stage, precision):
    """train.optimizer adamw_8bit with DeepSpeed: bitsandbytes' AdamW8bit as DeepSpeed's client
    optimizer, over ZeRO's flat fp32 partitions (one rank here): the losses and gradient norms
    of three steps of a full fine-tune are DDP's with the same optimizer (DeepSpeed's 16-bit
    weights move them a little in bf16); its ZeRO shard holds uint8 states; loaded into a new
    engine, the next step is the one the engine that went on took."""
    monkeypatch.setenv("LOCAL_RANK", "0")  # as Ray Train sets them, for DeepSpeed
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")

    def zero_job(strategy: str):
        return config_from_dict({"method": "full", "data": {"train": "t.jsonl"}, "distributed": {
            "strategy": strategy, "num_workers": 1, "deepspeed": {"stage": stage}}, "train": {
            "precision": precision, "learning_rate": 1e-3, "warmup_steps": 0, "optimizer": "adamw_8bit"}})

    torch.manual_seed(0)
    ids = torch.randint(3, 700, (4, 64))
    batch = {"input_ids": ids, "labels": ids, "position_ids": torch.arange(64).repeat(4, 1)}
    zero = engine_of(zero_job("deepspeed"))
    assert type(zero.engine.optimizer.optimizer).__name__ == "AdamW8bit"
    went = steps(zero, batch, 3)
    assert went == pytest.approx(steps(engine_of(zero_job("ddp")), batch, 3), rel=1e-5 if precision == "fp32" else 0.03)
    assert went[4] < 0.8 * went[0]

    zero.save(tmp_path, rank=0)
    from ft_ray.train.deepspeed_engine import weights_only_checkpoint_engine

    shard = weights_only_checkpoint_engine().load(str(next((tmp_path / "deepspeed" / "state").glob("*optim_states.pt"))))
    assert torch.uint8 in {t.dtype for t in gathered_tensors(shard)}
    resumed = engine_of(zero_job("deepspeed"))
    resumed.load(tmp_path)
    assert steps(resumed, batch, 1) == steps(zero, batch, 1)
    for (name, went_on), back in zip(zero.module.named_parameters(), resumed.module.parameters()):
        torch.testing.assert_close(back, went_on, rtol=0, atol=0, msg=name)


def gathered_tensors(state) -> list[torch.Tensor]:
    """Every tensor in a nested checkpoint state."""
    if torch.is_tensor(state):
        return [state]
    if isinstance(state, dict):
        state = list(state.values())
    return [t for item in state for t in gathered_tensors(item)] if isinstance(state, (list, tuple)) else []


# ZeRO-3 keeps weights under 1e5 elements (all of the built-in model's) whole on each worker, and up to 1e9
# weights gathered between forwards: told not to, each forward gathers every weight, as an 8B model's do
NO_CACHE = {"stage3_param_persistence_threshold": 0, "stage3_max_live_parameters": 0, "stage3_max_reuse_distance": 0}
SHARDED = {"zero3": {"strategy": "deepspeed", "deepspeed": {"stage": 3, "config_override": {"zero_optimization": NO_CACHE}}},
           "fsdp": {"strategy": "fsdp"}}


def grpo_steps(rank: int, port: int, folder: str) -> None:
    """One of two ranks (spawned): GRPO on two demo prompts of its own, under FSDP, ZeRO-3
    and DDP (torch's wrapper, as Ray Train's `prepare_model` gives it): the greedy eval reward
    before training (a generation before any training forward), then 3 steps' losses and
    gradient norms, written to `folder`/<rank>.json."""
    import json
    import os
    from datetime import timedelta

    from ft_ray.models import load_tokenizer
    from ft_ray.train.grpo import whole_weights
    from tests.unit.train.test_grpo import demo_batch

    os.environ.update(LOCAL_RANK=str(rank), RANK=str(rank), WORLD_SIZE="2")  # as Ray Train sets them, for DeepSpeed
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=timedelta(seconds=60))  # a rank left waiting fails the test, not hangs it
    seen = {}
    for strategy in (*SHARDED, "ddp"):
        config = config_from_dict({"objective": "grpo", "method": "qlora", "data": {"train": "t.jsonl"},
                                   "distributed": SHARDED.get(strategy, {"strategy": "ddp"}), "lora": {"dropout": 0.0},
                                   "quantization": {"quant_storage": "float32", "compute_dtype": "float32"},
                                   "train": {"learning_rate": 5e-3, "warmup_steps": 0},
                                   "grpo": {"rewards": {"format": 1.0}, "format_regex": "(?s)Hi .*",
                                            "max_new_tokens": 8, "beta": 0.1}})  # KL to the adapter off
        engine = engine_of(config)
        if strategy == "ddp":
            engine.model = torch.nn.parallel.DistributedDataParallel(engine.module)
        whole = demo_batch(load_tokenizer(config.model))
        batch = {k: v[2 * rank:2 * rank + 2] for k, v in whole.items()}
        batch["seq_id"] = torch.tensor([2 * rank, 2 * rank + 1])  # seeds the sampling: all strategies sample alike
        seen[strategy] = [engine.eval_loss_sum(batch)[2]["reward"], *steps(engine, batch, 3)]
        objective = engine.objective
        objective.max_new_tokens = 1 + 7 * rank  # the ranks' answers end after other numbers of forwards
        seen[f"{strategy} answers"] = objective.sample(engine.engine if strategy == "zero3" else engine.model,
                                                       objective.prompts_of(batch)[0], 1, sampled=False)
        seen[f"{strategy} after"] = steps(engine, batch, 1)  # sampled so too, in step
        if strategy == "zero3":  # each worker holds every weight whole in the block, its own part after
            with whole_weights(engine.engine):
                seen["zero3 whole"] = [p.numel() == p.ds_numel for p in engine.module.parameters()]
            seen["zero3 whole"] += [p.numel() == 0 for p in engine.module.parameters()]
    (Path(folder) / f"{rank}.json").write_text(json.dumps(seen))
    dist.destroy_process_group()


def test_grpo_generates_from_gathered_weights_on_every_rank_as_ddp_does(tmp_path):
    """Two ranks with prompts of their own, QLoRA with the KL to the adapter off: under FSDP
    and ZeRO-3 each generates from the whole model gathered once (`grpo.whole_weights`), and
    the rewards, losses and gradient norms are DDP's; ranks whose answers end after 1 and 8
    tokens answer as under DDP and train on in step."""
    import json

    torch.multiprocessing.start_processes(grpo_steps, args=(free_port(), str(tmp_path)), nprocs=2,
                                          start_method="spawn")
    ranks = [json.loads((tmp_path / f"{rank}.json").read_text()) for rank in (0, 1)]
    assert [len(answer) for answer in ranks[0]["ddp answers"]] == [1, 1]
    assert [len(answer) for answer in ranks[1]["ddp answers"]] == [8, 8]
    for rank, seen in enumerate(ranks):
        for strategy in SHARDED:
            assert seen[strategy] == pytest.approx(seen["ddp"], rel=1e-5, abs=1e-8), (strategy, rank)
            assert seen[f"{strategy} answers"] == seen["ddp answers"], (strategy, rank)
            assert seen[f"{strategy} after"] == pytest.approx(seen["ddp after"], rel=1e-5, abs=1e-8), (strategy, rank)
    for strategy in SHARDED:
        assert ranks[0][strategy][2::2] == ranks[1][strategy][2::2]  # the gradient norm of all ranks' gradients
    assert all(ranks[0]["zero3 whole"]) and all(ranks[1]["zero3 whole"])


@pytest.mark.parametrize("settings, message", [
    ({"method": "qlora"}, "quantization.quant_storage: qlora with fsdp needs a float storage dtype"),
    ({"train": {"optimizer": "adamw_8bit"}}, "adamw_8bit runs with distributed.strategy ddp or deepspeed; fsdp shards"),
    ({"train": {"compile": True}}, "train.compile: compiles the whole model's forward"),
    ({"fsdp": "full_shard auto_wrap"}, r"unknown key 'fsdp' \(ft-ray's key: 'distributed.strategy: fsdp'\)"),  # HF's
    ({"method": "qlora", "quantization": {"quant_storage": "bfloat16"}, "distributed": {"fsdp": {"offload": "cpu"}}},
     "distributed.fsdp.offload: 4-bit weights cannot be offloaded"),
    ({"distributed": {"strategy": "ddp", "fsdp": {"offload": "cpu"}}},
     "distributed.fsdp.offload: needs distributed.strategy: fsdp"),
    ({"distributed": {"fsdp": {"cpu_offload": True}}}, r"ft-ray's key: 'distributed.fsdp.offload'"),
    ({"distributed": {"fsdp": {"fsdp_cpu_ram_efficient_loading": True}}},
     r"ft-ray's key: 'distributed.fsdp.cpu_ram_efficient_loading'"),
])
def test_fsdp_refuses_what_it_cannot_shard(settings, message):
    raw = {"data": {"train": "t.jsonl"}, **settings,
           "distributed": {"strategy": "fsdp", **settings.get("distributed", {})}}
    with pytest.raises(ConfigError, match=message):
        config_from_dict(raw)



def test_offloaded_shards_on_gpus_take_their_collectives_over_gloo_beside_nccl():
    """distributed.fsdp.offload on GPUs: the shards and their gradients are CPU tensors, which
    NCCL cannot reduce (the gradient norm, the weights gathered for a checkpoint): the workers'
    process group has gloo for CPU tensors beside NCCL (Ray's TorchConfig backend)."""
    from ft_ray.train.trainer import process_group_backend

    settings = lambda **dist: config_from_dict({"data": {"train": "t.jsonl"}, "distributed": {  # noqa: E731
        "strategy": "fsdp", "use_gpu": True, **dist}})
    assert process_group_backend(settings(fsdp={"offload": "cpu"})) == "cpu:gloo,cuda:nccl"
    assert process_group_backend(settings()) is None  # Ray's own choice: nccl on GPUs, gloo on CPUs


def rank0_loading_steps(rank: int, port: int, folder: str, strategy: str) -> None:
    """One of two ranks (spawned), under `strategy` (fsdp, zero3): a full fine-tune in fp32, LoRA
    over a bf16 base with gradient checkpointing (fsdp: its shards offloaded), DPO of a full
    fine-tune with its inline reference, LoRA distilled from a teacher (both frozen copies
    sharded alike), DPO continuing a DoRA adapter (`folder`/dora) with its inline reference,
    LoRA on what else PEFT reads of the weights (pissa's init, DoRA, lm_head trained whole), and
    under ZeRO-3 LoRA with added tokens, a LoRA reward model and LoRA on a mixture of experts'
    expert weights (`folder`/moe), each built with and without fsdp's
    `cpu_ram_efficient_loading` or ZeRO-3's `zero3_init`: the weights each model this rank
    loaded held whole (not empty, nor partitioned as it was built), its buffers, and three
    steps' losses and gradient norms, written to `folder`/<rank>.json."""
    import json
    import os
    from datetime import timedelta

    import ft_ray.models
    from ft_ray.data.formats import CHOSEN, REJECTED
    from ft_ray.models import with_adapter
    from ft_ray.train.flops import flops_per_token

    loaded, load = [], ft_ray.models.load_base_model

    def load_and_say(*args, empty: bool = False, **kwargs):  # each model's load: the weights it holds whole
        built = load(*args, empty=empty, **kwargs)
        loaded.append([n for n, p in built.named_parameters() if not (p.is_meta or p.numel() < getattr(p, "ds_numel", 0))])
        return built

    ft_ray.models.load_base_model = load_and_say
    os.environ.update(LOCAL_RANK=str(rank), RANK=str(rank), WORLD_SIZE="2")  # as Ray Train sets them, for DeepSpeed
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=timedelta(seconds=60))  # a rank left waiting fails the test, not hangs it
    torch.manual_seed(0)
    ids = torch.randint(3, 700, (2, 64))[rank:rank + 1]
    plain = {"input_ids": ids, "labels": ids, "position_ids": torch.arange(64)[None]}
    labels = ids.clone()
    labels[:, :16] = labels[:, 32:48] = -100  # a chosen and a rejected answer, each after 16 prompt tokens
    pairs = {"input_ids": ids, "labels": labels, "position_ids": torch.arange(32).repeat(1, 2),
             "roles": torch.tensor([CHOSEN] * 32 + [REJECTED] * 32)[None]}
    teacher = {"objective": "distill", "distill": {"teacher": "builtin:tiny-llama"}}
    offload = {"offload": "cpu"} if strategy == "fsdp" else {}
    inline = {"objective": "dpo", "reference": "inline"}
    cases = {"full": ("full", "fp32", {"weight_decay": 0.1}, plain),  # decay on matrices only (norms take none)
             "lora": ("lora", "bf16", offload, plain), "dpo": ("full", "fp32", inline, pairs),
             "distill": ("lora", "fp32", teacher, plain),
             "adapter": ("lora", "bf16", inline, pairs),  # continuing a DoRA adapter, its inline reference too
             "peft": ("lora", "bf16", {}, plain)}
    changes = {  # keys beyond job()'s
        "adapter": {"model": {"adapter": f"{folder}/dora"}, "lora": {"use_dora": True}},
        # what PEFT reads of the weights: pissa's A and B, DoRA's norms, a module it copies to train whole
        "peft": {"lora": {"init": "pissa", "use_dora": True, "modules_to_save": ["lm_head"]}}}
    if strategy == "zero3":
        added = ids.clone()  # 60 tokens added: the vocabulary grows past the 768 rows; one of them in the batch
        added[0, 5] = 770
        # a reward model's new score head (PEFT copies it to train whole); a mixture of experts' fused expert
        # weights, found by their shape
        cases |= {"tokens": ("lora", "bf16", {}, {**plain, "input_ids": added, "labels": added}),
                  "reward": ("lora", "bf16", {"objective": "reward_model"}, pairs),
                  "experts": ("lora", "bf16", {}, plain)}
        changes |= {"tokens": {"model": {"add_tokens": [f"<|added_{i}|>" for i in range(60)]}},
                    "experts": {"model": {"name_or_path": f"{folder}/moe"},
                                "lora": {"target_modules": ["q_proj", "gate_up_proj", "down_proj"]}}}
    seen = {}
    for name, (method, precision, settings, batch) in cases.items():
        for once in (True, False):
            config = job("fsdp" if strategy == "fsdp" else "deepspeed", method, precision,
                         gradient_checkpointing=name == "lora", **settings)
            flag = ({"fsdp": {"cpu_ram_efficient_loading": once}} if strategy == "fsdp" else
                    {"deepspeed": {**SHARDED["zero3"]["deepspeed"], "zero3_init": once}})
            raw = config.model_dump(mode="json")
            for key, value in {"distributed": flag, **changes.get(name, {})}.items():
                raw[key].update(value)
            config = with_adapter(config_from_dict(raw))
            # loaded once, rank 1 draws another LoRA A than rank 0, whose must reach it; else both draw the same
            torch.manual_seed(1 + rank if once else 1)
            loaded.clear()
            model = build_model(config, "builtin:tiny-llama")
            key = f"{name} {'once' if once else 'every worker'}"
            objective = build_objective(config, model)  # a frozen copy is loaded and sharded here
            frozen = getattr(objective, "reference", None) or getattr(objective, "teacher", None)
            copies = [model, *([frozen.model] if frozen is not None else [])]
            seen[f"{key} whole"] = list(loaded)
            seen[f"{key} flops"] = flops_per_token(model, method, 64)  # counted before the engine, as the loop does
            engine = build_engine(model, config, total_steps=10, objective=objective)
            seen[f"{key} buffers"] = [b.tolist() for copy in copies for b in copy.buffers()]
            seen[key] = steps(engine, batch, 3)
    (Path(folder) / f"{rank}.json").write_text(json.dumps(seen))
    dist.destroy_process_group()


@pytest.mark.parametrize("strategy", ["fsdp", "zero3"])
def test_only_rank0_reads_the_weights_and_every_rank_trains_as_if_all_had(tmp_path, strategy):
    """distributed.fsdp.cpu_ram_efficient_loading (the default): rank 1 builds the model empty
    (meta device) and takes its shards and buffers from rank 0, LoRA's random A included (rank
    1 draws another), and so the frozen copies it shards (DPO's inline reference, a distillation
    teacher); distributed.deepspeed.zero3_init (the default): every rank builds each model
    partitioned, rank 0 alone reading the weights, and DeepSpeed takes rank 0's A. The three
    steps of a full fine-tune, LoRA with gradient checkpointing (offloaded under fsdp), DPO,
    distillation, DPO continuing a DoRA adapter, LoRA initialised from the weights with DoRA and
    a module trained whole (fsdp: rank 0's; ZeRO-3: PEFT gathering the partitioned weights it
    reads) and (ZeRO-3) LoRA with 60 added tokens (the partitioned embeddings grown, rank 0's new
    rows partitioned too, their rows trained), a LoRA reward model and LoRA on named expert
    weights of a mixture of experts are those of a run whose ranks all load the weights and draw
    the same A."""
    import json

    torch.manual_seed(2)  # a DoRA adapter trained before (B moved off zero), for model.adapter
    dora = build_model(config_from_dict({"method": "lora", "data": {"train": "t.jsonl"}, "lora": {"use_dora": True}}),
                       "builtin:tiny-llama")
    for name, weight in dora.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(weight, std=0.02)
    dora.save_pretrained(tmp_path / "dora")
    if strategy == "zero3":
        from tests.conftest import tiny_moe

        tiny_moe(tmp_path / "moe")
    torch.multiprocessing.start_processes(rank0_loading_steps, args=(free_port(), str(tmp_path), strategy), nprocs=2,
                                          start_method="spawn")
    ranks = [json.loads((tmp_path / f"{rank}.json").read_text()) for rank in (0, 1)]
    for case in ("full", "lora", "dpo", "distill", "adapter", "peft", *(["tokens", "reward", "experts"] if strategy == "zero3" else [])):
        copies = 2 if case in ("dpo", "distill", "adapter") else 1
        # none whole: the vocabulary grown, the new embeddings and output layer are partitioned too
        once, every = ([seen[f"{case} {how} whole"] for seen in ranks] for how in ("once", "every worker"))
        assert once[1] == [[]] * copies and all(every[0]) and all(every[1]) and every[0] == every[1], case
        assert once[0] == (once[1] if strategy == "zero3" else every[0]), case
        assert ranks[1][f"{case} once buffers"] == ranks[0][f"{case} once buffers"], case
        assert ranks[1][f"{case} once flops"] == ranks[0][f"{case} every worker flops"], case
        for seen in ranks:
            torch.testing.assert_close(seen[f"{case} once"], seen[f"{case} every worker"], rtol=1e-6, atol=0,
                                       msg=case)
        assert ranks[0][f"{case} once"][2] != ranks[0][f"{case} once"][0], case  # the weights move
