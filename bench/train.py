"""ft-ray's training step against its peers on the same model shape, data, sequence budget
and device, in one run:

    python -m bench.train --mode lora [--baselines hf,trl,unsloth] [--records 2000] [--repeat 3] [--passes 3]
                          [--device cpu|cuda]

The peers (`--baselines`, default all three; one that cannot run here is reported "not
available" with the reason, never dropped): `hf`, Hugging Face Trainer + PEFT with padded
batches (the usual recipe, the floor); `trl`, TRL's SFTTrainer at its best documented
settings (packed with best-fit decreasing, padding-free, liger kernels on CUDA, fused AdamW;
TRL's default gradient checkpointing and bf16 set as ft-ray's arm has them); `unsloth`
(CUDA), its FastLanguageModel under the same SFTTrainer. Every arm trains the same token ids
with the same loss masks, LoRA rank and targets (or full), micro batch size (sequences per
step) and `--max-seq-len`; ft-ray packs examples into full sequences (attention kept inside
each example by restarting position ids) and uses its own engine (fused AdamW by default,
liger kernels on CUDA). Tokens/s counts real tokens only (no padding), the same count in
every arm. Every arm times the steps after the first `--warmup-steps` (CUDA/cuBLAS set-up,
Triton compiles of fused kernels), and each later pass whole; an arm's figure is the median
of its passes (repeats without reloading the model: what a GPU's short lease allows), the
printed figures the medians over `--repeat` runs. Each arm runs in a fresh subprocess, so
its peak memory is its own (peak RSS on CPU, peak allocated GPU memory on CUDA). On CPU the
model is the built-in tiny Llama; on CUDA a Llama-3.2-1B-shaped model (random init, no
download) in bf16 at sequence length 2048; `--shape 8b` a Llama-3.1-8B-shaped one (with
`--train gradient_checkpointing=true` every arm recomputes activations).

The last line printed is one JSON object: mode, device, ft_ray_tokens_per_s, ratios (ft-ray's
tokens/s over each peer's), arms (each arm's tokens/s, MFU by the project's FLOP count, peak
memory, first/last loss, steps, settings, or why it is not available), mfu (ft-ray's; medians);
baseline_tokens_per_s, ratio and baseline_peak_mem_mb are the hf arm's, as earlier results
name them.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

# Model shapes of random-init models (no download): Llama-3.2-1B's with the built-in tokenizer's
# vocabulary (the GPU rows so far), Llama-3.1-8B's whole (its 128,256-token vocabulary and
# untied output layer weigh in memory and FLOPs; token ids come from the built-in tokenizer).
SHAPES = {
    "1b": {"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32,
           "num_key_value_heads": 8, "head_dim": 64, "max_position_embeddings": 4096, "tie_word_embeddings": True,
           "rope_parameters": {"rope_type": "default", "rope_theta": 500000.0}},
    "8b": {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
           "num_key_value_heads": 8, "head_dim": 128, "max_position_embeddings": 131072, "vocab_size": 128256,
           "tie_word_embeddings": False, "rms_norm_eps": 1e-5,
           "rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}},
}


def job_config(mode: str, device: str, model_path: str, max_seq_len: int, micro_batch: int,
               fused_kernels: str = "auto", train: list[str] = ()) -> Any:
    from ft_ray.config import config_from_dict

    gpu = device == "cuda"
    return config_from_dict({
        "method": mode, "model": {"name_or_path": model_path, "max_seq_len": max_seq_len},
        "data": {"train": "unused.jsonl"},
        "lora": {"rank": 16, "alpha": 32, "dropout": 0.0, "target_modules": "all-linear"},
        "quantization": {"compute_dtype": "bfloat16" if gpu else "float32"},
        "distributed": {"num_workers": 1, "use_gpu": gpu},
        "train": {"learning_rate": 1e-4, "micro_batch_size": micro_batch, "warmup_steps": 0,
                  "precision": "bf16" if gpu else "fp32", "fused_kernels": fused_kernels,
                  **dict(_setting(item) for item in train)}})


def _setting(item: str) -> tuple[str, Any]:
    """`--train key=value` (ft-ray's arm only): the value read as YAML (true, 0.5, none)."""
    import yaml

    key, _, value = item.partition("=")
    return key, yaml.safe_load(value)


def make_model(device: str, folder: Path, shape: str = "tiny", settings: list[str] = ()) -> str:
    """The model every arm loads: the built-in tiny Llama (`tiny`), else a random-init model of
    SHAPES[shape] in bf16 written to `folder` (reused when there), its keys changed by
    `settings` (KEY=VALUE: a smaller model of the same code path, to try it on a CPU)."""
    if shape == "tiny":
        return "builtin:tiny-llama"
    if (folder / "config.json").exists():
        return str(folder)
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from ft_ray.config import ModelConfig
    from ft_ray.models import load_tokenizer

    tokenizer = load_tokenizer(ModelConfig())
    values = {"vocab_size": max(len(tokenizer), 32000), **SHAPES[shape], **dict(_setting(item) for item in settings)}
    config = LlamaConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, **values)
    torch.manual_seed(0)
    with torch.device(device):  # random init of 1B weights takes seconds on a GPU, a minute on the CPU
        model = LlamaForCausalLM._from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    del model
    return str(folder)


def examples(corpus: Path, tokenizer: Any, max_seq_len: int, fmt: str = "instruction") -> list[dict]:
    """Token ids and loss masks of every record (a JSONL file, or a folder of them), exactly as
    ft-ray's pipeline makes them."""
    from ft_ray.data.records import tokenize_batch

    files = [corpus] if corpus.is_file() else sorted(corpus.glob("*.jsonl"))
    lines = [line for f in files for line in f.read_text().splitlines()]
    out = tokenize_batch(lines, [""] * len(lines), fmt, {}, tokenizer, max_seq_len, None)
    return [e for e in out if isinstance(e, dict)]


def stack_batch(chunk: list[dict], device: Any) -> dict:
    """Packed sequences as the engine's batch of long tensors on `device`."""
    import numpy as np
    import torch

    return {k: torch.from_numpy(np.stack([s[k] for s in chunk])).long().to(device, non_blocking=True)
            for k in ("input_ids", "labels", "position_ids")}


def peak_memory_mb(device: str) -> float:
    if device == "cuda":
        import torch

        return torch.cuda.max_memory_allocated() / 2 ** 20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _sync(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def ft_ray_arm(config: Any, data: list[dict], warmup: int, passes: int = 1) -> dict[str, Any]:
    """ft-ray's own step: packed sequences, its model build and engine, outside Ray."""
    from ft_ray.data.tokenize import pack_examples
    from ft_ray.models import load_tokenizer
    from ft_ray.train.engines import build_engine
    from ft_ray.train.objectives import build_objective
    from ft_ray.train.modeling import build_model

    tokenizer = load_tokenizer(config.model)
    sequences = list(pack_examples(data, config.model.max_seq_len, tokenizer.pad_token_id))
    size = config.train.micro_batch_size
    steps = len(sequences) // size
    model = build_model(config, config.model.name_or_path)
    engine = build_engine(model, config, steps * passes, build_objective(config))
    device = engine.device
    clock, losses, phases = PassClock(device.type, steps, warmup), [], {}
    for done in range(steps * passes):
        step = done % steps
        clock.before_step(done)
        chunk = sequences[step * size:(step + 1) * size]
        batch = stack_batch(chunk, device)
        if device.type == "cuda" and done == warmup:
            losses.append(memory_phases(engine, batch, phases))
        else:
            losses.append(engine.micro_step(batch, 1.0, True)[0])
            engine.step()
        clock.add(sum(int(s["num_tokens"]) for s in chunk))
    clock.close()
    rate = statistics.median(clock.rates)
    return {"tokens_per_s": rate, "pass_tokens_per_s": [round(r) for r in clock.rates], "steps": steps,
            "sequences": len(sequences), "peak_mem_mb": max([peak_memory_mb(device.type), *phases.values()]),
            "memory_phases_mb": phases,
            "loss_first_last": [round(losses[0], 3), round(losses[-1], 3)],
            "attention": model.config._attn_implementation, "liger": use_fused_kernels_applied(model),
            "optimizer": ("8-bit AdamW" if config.train.optimizer == "adamw_8bit"
                          else "fused AdamW" if config.train.fused_optimizer else "AdamW"),
            "settings": "packed sequences, per-example attention spans" + checkpointing(config),
            "mfu": mfu(engine.module, config, rate)}


def mfu(model: Any, config: Any, tokens_per_s: float) -> float | None:
    """Model FLOPs utilisation by the project's FLOP count (ft_ray.train.flops), the same for
    every arm; None where the device's peak is unknown (CPU)."""
    from ft_ray.train.flops import flops_per_token, peak_flops

    peak = peak_flops(None, config.distributed.use_gpu, config.train.precision)
    return tokens_per_s * flops_per_token(model, config.method, config.model.max_seq_len) / peak if peak else None


def checkpointing(config: Any) -> str:
    return ", gradient checkpointing" if config.train.gradient_checkpointing else ""


class PassClock:
    """Tokens/s of each pass over the data (one epoch of `per_pass` steps); the first pass
    is timed from its `warmup`-th step on (set-up, first kernel compiles), the others whole.
    With `profile_steps` (`--profile N`) the N steps after the warmup run under torch's
    profiler, and `profile` holds where their time went (that run's tokens/s are not quoted)."""

    profile_steps = 0
    profile: list | None = None

    def __init__(self, device: str, per_pass: int, warmup: int):
        self.device, self.per_pass, self.warmup = device, per_pass, warmup
        self.rates: list[float] = []
        self.tokens, self.started, self.profiler = 0, None, None

    def before_step(self, done: int) -> None:
        """Call before step `done` (counted over all passes) starts."""
        if done and done % self.per_pass == 0:
            self.close()
        if done == self.warmup or (done >= self.per_pass and done % self.per_pass == 0):
            _sync(self.device)
            self.tokens, self.started = 0, time.perf_counter()
        if self.profile_steps and done == self.warmup:
            import torch

            activities = [torch.profiler.ProfilerActivity.CPU]
            if self.device == "cuda":
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self.profiler = torch.profiler.profile(activities=activities)
            self.profiler.__enter__()
        elif self.profiler is not None and done == self.warmup + self.profile_steps:
            self._end_profile()

    def _end_profile(self) -> None:
        """The top operators by self time (device time on CUDA), with their share of it all."""
        _sync(self.device)
        self.profiler.__exit__(None, None, None)
        key = "self_device_time_total" if self.device == "cuda" else "self_cpu_time_total"
        ops = sorted(self.profiler.key_averages(), key=lambda e: getattr(e, key), reverse=True)
        total = sum(getattr(e, key) for e in ops) or 1
        PassClock.profile = [[e.key, round(getattr(e, key) / 1e3, 1), round(getattr(e, key) / total, 3), e.count]
                             for e in ops[:15]]
        self.profiler = None

    def add(self, tokens: int) -> None:
        if self.started is not None:
            self.tokens += tokens

    def close(self) -> None:
        if self.profiler is not None:
            self._end_profile()
        if self.started is not None:
            _sync(self.device)
            self.rates.append(self.tokens / (time.perf_counter() - self.started))
            self.started = None


def memory_phases(engine: Any, batch: dict, phases: dict) -> float:
    """One CUDA step taken in its parts, noting the peak allocated memory (MiB) of each: where
    the peak of a run comes from (activations at the end of forward, gradients, optimizer)."""
    import torch

    mib = 2 ** 20
    phases["before_step"] = torch.cuda.max_memory_allocated() / mib  # the earlier steps' peak
    torch.cuda.reset_peak_memory_stats()
    loss = engine.forward_loss(batch)[0]
    phases["forward"], phases["after_forward"] = torch.cuda.max_memory_allocated() / mib, torch.cuda.memory_allocated() / mib
    torch.cuda.reset_peak_memory_stats()
    loss.backward()
    phases["backward"] = torch.cuda.max_memory_allocated() / mib
    torch.cuda.reset_peak_memory_stats()
    engine.step()
    phases["optimizer"] = torch.cuda.max_memory_allocated() / mib
    return loss.item()


def use_fused_kernels_applied(model: Any) -> bool:
    """Whether liger-kernel's layers are in the model."""
    from ft_ray.train.fast_paths import liger_patched

    return any(liger_patched(m) for m in model.modules())


# ft-ray's schedule (engine_api.warmup_cosine with no warmup: cosine decay to 0.1 of the rate over
# the run) for the Trainer-based arms, so the first and last losses of every arm compare
SAME_SCHEDULE = {"lr_scheduler_type": "cosine_with_min_lr", "lr_scheduler_kwargs": {"min_lr_rate": 0.1},
                 "warmup_steps": 0}


def hf_model(config: Any, attention: str | None = None) -> tuple[Any, Any, str]:
    """(model, tokenizer, device) as the Trainer-based arms load them: PEFT LoRA on all linear
    layers (QLoRA: on a 4-bit NF4 base), bf16 on CUDA; `attention`: transformers' attention
    implementation (default: its own choice, sdpa)."""
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from ft_ray.models import ASSETS, load_tokenizer

    gpu = config.distributed.use_gpu
    path = str(ASSETS / "tiny-llama") if config.model.name_or_path.startswith("builtin:") else config.model.name_or_path
    dtype = torch.bfloat16 if gpu else torch.float32
    if config.method == "qlora":
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, device_map={"": "cuda:0" if gpu else "cpu"},
                                                     attn_implementation=attention,
                                                     quantization_config=BitsAndBytesConfig(
                                                         load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                         bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype))
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=config.train.gradient_checkpointing)
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation=attention)
    if config.method != "full":
        model = get_peft_model(model, LoraConfig(r=config.lora.rank, lora_alpha=config.lora.alpha, lora_dropout=0.0,
                                                 target_modules="all-linear", task_type="CAUSAL_LM"))
    return model, load_tokenizer(config.model), "cuda" if gpu else "cpu"


def timed(trainer_class: type, clock: "PassClock", tokens_of: Any, losses: list) -> type:
    """`trainer_class` counting the real tokens of each step per pass (epoch), keeping the
    loss of the first and the last step (a sync only there)."""

    class Timed(trainer_class):
        done = 0

        def training_step(self, model, inputs, *args, **kwargs):
            clock.before_step(Timed.done)
            Timed.done += 1
            clock.add(tokens_of(inputs))
            loss = super().training_step(model, inputs, *args, **kwargs)
            if Timed.done == 1 or Timed.done == self.state.max_steps:
                losses.append(round(float(loss), 3))
            return loss

    return Timed


# transformers' name of the optimizer of ft-ray's `train.optimizer` (`--train optimizer=adamw_8bit`)
PEER_OPTIMIZERS = {"adamw": "adamw_torch_fused", "adamw_8bit": "adamw_8bit"}


def hf_arm(config: Any, data: list[dict], warmup: int, passes: int = 1) -> dict[str, Any]:
    """The usual recipe: HF Trainer, PEFT LoRA (QLoRA: 4-bit base), padded batches."""
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

    model, tokenizer, device = hf_model(config)
    clock, losses = PassClock(device, math.ceil(len(data) / config.train.micro_batch_size), warmup), []
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(output_dir=out, per_device_train_batch_size=config.train.micro_batch_size,
                                 num_train_epochs=passes, learning_rate=config.train.learning_rate,
                                 **SAME_SCHEDULE, logging_strategy="no", save_strategy="no",
                                 report_to=[], use_cpu=device == "cpu", bf16=device == "cuda", dataloader_num_workers=0,
                                 gradient_checkpointing=config.train.gradient_checkpointing,
                                 remove_unused_columns=False, disable_tqdm=True, seed=0,
                                 **({"optim": "adamw_8bit"} if config.train.optimizer == "adamw_8bit" else {}))
        trainer = timed(Trainer, clock, lambda inputs: int(inputs["attention_mask"].sum()), losses)(
            model=model, args=args, train_dataset=[dict(e) for e in data],
            data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100))
        trainer.train()
        clock.close()
    rate = statistics.median(clock.rates)
    return {"tokens_per_s": rate, "pass_tokens_per_s": [round(r) for r in clock.rates], "mfu": mfu(model, config, rate),
            "steps": clock.per_pass, "optimizer": args.optim, "attention": model.config._attn_implementation,
            "peak_mem_mb": peak_memory_mb(device), "loss_first_last": losses,
            "settings": "padded batches" + checkpointing(config)}


# The trl arm's attention (`--peer-attention`). A padding-free batch is one flattened sequence
# whose examples only their position ids part. auto: flash-attention's varlen kernel
# (flash_attention_2, what TRL's documentation asks for with padding_free) where the package is
# installed, else transformers' default, sdpa, which masks the whole flattened sequence (profiled
# in RESULTS.md). flex_attention (a block mask skipping the pairs of examples that do not attend
# to each other) can be asked for; it is not the default: it has no backward on a CPU to try it
# on, and it compiles again for every new flattened length.
PEER_ATTENTION = "auto"


def peer_attention(gpu: bool) -> str:
    if PEER_ATTENTION != "auto":
        return PEER_ATTENTION
    import importlib.util

    return "flash_attention_2" if gpu and importlib.util.find_spec("flash_attn") else "sdpa"


def trl_arm(config: Any, data: list[dict], warmup: int, passes: int = 1) -> dict[str, Any]:
    """TRL's SFTTrainer at its best documented settings on the PEFT model the hf arm trains,
    with the best attention for its padding-free batches (`peer_attention`)."""
    model, tokenizer, device = hf_model(config, peer_attention(config.distributed.use_gpu))
    return sft_trainer_run(config, data, warmup, passes, model, tokenizer, device)


def sft_trainer_run(config: Any, data: list[dict], warmup: int, passes: int, model: Any, tokenizer: Any,
                    device: str) -> dict[str, Any]:
    """TRL's SFTTrainer: packed with best-fit decreasing and no padding (position ids restart
    per example), the same labels (the same loss masks), liger kernels on CUDA, fused AdamW.
    TRL's defaults of gradient checkpointing and bf16 are set as ft-ray's arm has them
    (`train.gradient_checkpointing`, off unless `--train gradient_checkpointing=true`; bf16
    only on CUDA)."""
    import datasets
    from trl import SFTConfig, SFTTrainer

    gpu = device == "cuda"
    liger = gpu and has_liger()
    clock, losses = PassClock(device, 1, warmup), []
    with tempfile.TemporaryDirectory() as out:
        args = SFTConfig(output_dir=out, per_device_train_batch_size=config.train.micro_batch_size,
                         num_train_epochs=passes, learning_rate=config.train.learning_rate,
                         **SAME_SCHEDULE, logging_strategy="no", save_strategy="no", report_to=[],
                         use_cpu=not gpu, bf16=gpu, gradient_checkpointing=config.train.gradient_checkpointing,
                         dataloader_num_workers=0,
                         disable_tqdm=True, seed=0, packing=True, packing_strategy="bfd", padding_free=True,
                         max_length=config.model.max_seq_len, use_liger_kernel=liger,
                         optim=PEER_OPTIMIZERS[config.train.optimizer])
        train = datasets.Dataset.from_list([{"input_ids": e["input_ids"], "labels": e["labels"]} for e in data])
        trainer = timed(SFTTrainer, clock, lambda inputs: int(inputs["input_ids"].numel()), losses)(
            model=model, args=args, train_dataset=train, processing_class=tokenizer)
        clock.per_pass = math.ceil(len(trainer.train_dataset) / config.train.micro_batch_size)  # packed sequences
        trainer.train()
        clock.close()
    rate = statistics.median(clock.rates)
    return {"tokens_per_s": rate, "pass_tokens_per_s": [round(r) for r in clock.rates], "mfu": mfu(model, config, rate),
            "steps": clock.per_pass, "optimizer": args.optim, "attention": model.config._attn_implementation,
            "peak_mem_mb": peak_memory_mb(device), "loss_first_last": losses, "liger": liger,
            "settings": "packing bfd, padding_free, " + ("bf16" if gpu else "fp32") + checkpointing(config)}


def has_liger() -> bool:
    try:
        import liger_kernel  # noqa: F401
        return True
    except ImportError:
        return False


def unsloth_arm(config: Any, data: list[dict], warmup: int, passes: int = 1) -> dict[str, Any]:
    """Unsloth's FastLanguageModel (its kernels and LoRA) under TRL's SFTTrainer, with the
    settings its documentation recommends (CUDA only). Not yet run: no GPU image here has it."""
    if not config.distributed.use_gpu:
        raise ImportError("unsloth needs a CUDA GPU")
    import torch
    import unsloth  # noqa: F401 - first: it patches transformers and TRL on import
    from unsloth import FastLanguageModel

    model, tokenizer = FastLanguageModel.from_pretrained(
        model_name=config.model.name_or_path, max_seq_length=config.model.max_seq_len, dtype=torch.bfloat16,
        load_in_4bit=config.method == "qlora", full_finetuning=config.method == "full")
    if config.method != "full":
        model = FastLanguageModel.get_peft_model(
            model, r=config.lora.rank, lora_alpha=config.lora.alpha, lora_dropout=0.0, bias="none",
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
            use_gradient_checkpointing=False)
    return sft_trainer_run(config, data, warmup, passes, model, tokenizer, "cuda")


ARMS = {"ft-ray": ft_ray_arm, "hf": hf_arm, "trl": trl_arm, "unsloth": unsloth_arm}


def run_arm(args: argparse.Namespace) -> None:
    """One arm in this (fresh) process; prints its figures as JSON."""
    from ft_ray.models import load_tokenizer

    config = job_config(args.mode, args.device, args.model, args.max_seq_len, args.micro_batch, args.fused_kernels,
                        args.train)
    data = examples(Path(args.corpus), load_tokenizer(config.model), args.max_seq_len)
    global PEER_ATTENTION
    PassClock.profile_steps, PEER_ATTENTION = args.profile, args.peer_attention
    try:
        figures = ARMS[args.arm](config, data, args.warmup_steps, args.passes)
    except ImportError as e:  # an arm whose library is not installed here: said, never dropped silently
        figures = {"not_available": f"{type(e).__name__}: {e}"}
    if PassClock.profile:
        figures["profile"] = PassClock.profile
    print(json.dumps(figures))


def arm_in_subprocess(arm: str, args: argparse.Namespace, model: str, corpus: Path,
                      fused_kernels: str = "auto", attention: str | None = None) -> dict[str, Any]:
    try:
        return json_of("bench.train", [
            "--arm", arm, "--mode", args.mode, "--device", args.device, "--model", model, "--corpus", str(corpus),
            "--max-seq-len", str(args.max_seq_len), "--micro-batch", str(args.micro_batch),
            "--warmup-steps", str(args.warmup_steps), "--passes", str(args.passes), "--fused-kernels", fused_kernels,
            "--profile", str(args.profile), "--peer-attention", attention or args.peer_attention,
            *[f"--train={item}" for item in args.train]])
    except RuntimeError as e:
        # say why, then measure the arm on its plainer path rather than nothing
        if arm == "ft-ray" and fused_kernels == "auto" and args.device == "cuda":
            print(f"ft-ray arm failed with fused kernels; again without them:\n{e}", flush=True)
            return {**arm_in_subprocess(arm, args, model, corpus, "none"), "fused_kernels_failed": True}
        if arm == "trl" and attention is None and args.peer_attention != "sdpa" and args.device == "cuda":
            print(f"trl arm failed with flash_attention_2; again with sdpa:\n{e}", flush=True)
            return {**arm_in_subprocess(arm, args, model, corpus, attention="sdpa"), "attention_failed": True}
        raise RuntimeError(f"{arm} arm failed:\n{e}") from None


def json_of(module: str, argv: list[str]) -> dict[str, Any]:
    """`python -m MODULE ARGV` in a fresh process: the JSON object its last line prints.

    Raises:
        RuntimeError: it failed (the end of its stderr).
    """
    done = subprocess.run([sys.executable, "-m", module, *argv], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[1], env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-4000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mode", choices=["full", "lora", "qlora"], default="lora")
    add_device_option(parser)
    parser.add_argument("--records", type=int, default=None, help="default: 600 on CPU, 4000 on CUDA")
    parser.add_argument("--max-seq-len", type=int, default=None, help="default: 1024 on CPU, 2048 on CUDA")
    parser.add_argument("--micro-batch", type=int, default=None, help="sequences per step; default 4 on CPU, 8 on CUDA")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--passes", type=int, default=1, help=(
        "timed passes over the data in each arm's process (one model load): its figure is their median"))
    parser.add_argument("--warmup-steps", type=int, default=3, help="steps of each arm left out of the timing")
    parser.add_argument("--shape", choices=["tiny", *SHAPES], default=None, help=(
        "the model: tiny (the built-in tiny Llama; default on CPU), 1b (Llama-3.2-1B's shape; default on CUDA) or "
        "8b (Llama-3.1-8B's), random init in bf16"))
    parser.add_argument("--model-setting", action="append", default=[], metavar="KEY=VALUE", help=(
        "a key of the shape's model config changed (repeatable), e.g. num_hidden_layers=2: the 8B code path small "
        "enough for a CPU"))
    parser.add_argument("--model-dir", help="where the random-init model is written (or reused, if there)")
    parser.add_argument("--train", action="append", default=[], metavar="KEY=VALUE",
                        help="a train setting of ft-ray's arm, e.g. recompute_swiglu=false (repeatable); the peers "
                             "take gradient_checkpointing from it too")
    parser.add_argument("--baselines", default="hf,trl,unsloth", help=(
        "peers measured against ft-ray, comma-separated: hf (Trainer + PEFT, padded), trl (SFTTrainer, packed, "
        "padding-free), unsloth (CUDA); one that cannot run here is reported as not available"))
    parser.add_argument("--profile", type=int, default=0, metavar="N", help=(
        "profile N steps of every arm after its warmup (torch.profiler): the top operators by self time in "
        "each arm's figures and printed; the tokens/s of a profiled run are not for quoting"))
    parser.add_argument("--peer-attention", default="auto", help=(
        "the trl arm's attention: auto (flash_attention_2 on CUDA where installed, else sdpa) or a transformers "
        "attn_implementation, e.g. flex_attention"))
    parser.add_argument("--arm", choices=list(ARMS), help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--corpus", help=argparse.SUPPRESS)
    parser.add_argument("--fused-kernels", default="auto", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.device = chosen_device(args.device)
    gpu = args.device == "cuda"
    args.max_seq_len = args.max_seq_len or (2048 if gpu else 1024)
    args.micro_batch = args.micro_batch or (8 if gpu else 4)
    args.shape = args.shape or ("1b" if gpu else "tiny")
    if args.arm:
        return run_arm(args)

    from bench.corpus import write_corpus

    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "corpus"
        write_corpus(corpus, records=args.records or (4000 if gpu else 600), files=1)
        model = make_model(args.device, Path(args.model_dir or Path(tmp) / "model"), args.shape, args.model_setting)
        peers = [b.strip() for b in args.baselines.split(",") if b.strip()]
        unknown = [b for b in peers if b not in ARMS or b == "ft-ray"]
        if unknown:
            raise SystemExit(f"--baselines: unknown {unknown}; known: hf, trl, unsloth")
        runs: dict[str, list[dict]] = {arm: [] for arm in ["ft-ray", *peers]}
        for _ in range(args.repeat):
            for arm in [*peers, "ft-ray"]:
                if runs[arm] and "not_available" in runs[arm][-1]:
                    continue  # it will not import the next time either
                runs[arm].append(arm_in_subprocess(arm, args, model, corpus))
            print(" | ".join(describe_arm(arm, results[-1]) for arm, results in runs.items()), flush=True)
            ours = runs["ft-ray"][-1]
            if args.passes > 1:
                print("  per pass, tokens/s: " + ", ".join(f"{arm} {r[-1].get('pass_tokens_per_s')}"
                                                          for arm, r in runs.items()), flush=True)
            for arm, results in runs.items():
                for name, ms, share, calls in results[-1].get("profile", []):
                    print(f"  {arm} profile: {share:6.1%} {ms:10.1f} ms {calls:6d}x {name}", flush=True)
            if ours.get("memory_phases_mb"):
                print("ft-ray peak MiB by phase of one step:",
                      {k: round(v) for k, v in ours["memory_phases_mb"].items()}, flush=True)

    def median(arm: str, key: str) -> float | None:
        values = [r[key] for r in runs[arm] if r.get(key) is not None]
        return statistics.median(values) if values else None

    ours = median("ft-ray", "tokens_per_s")
    arms = {arm: ({"not_available": results[0]["not_available"]} if "not_available" in results[0] else {
        "tokens_per_s": round(median(arm, "tokens_per_s"), 1), "peak_mem_mb": round(median(arm, "peak_mem_mb"), 1),
        "mfu": median(arm, "mfu"),
        "loss_first_last": results[0].get("loss_first_last"), "steps": results[0].get("steps"),
        "attention": results[0].get("attention"), "optimizer": results[0].get("optimizer"),
        "settings": results[0].get("settings"), **({"profile": results[0]["profile"]} if args.profile else {})})
        for arm, results in runs.items()}
    ratios = {arm: round(ours / figures["tokens_per_s"], 3) for arm, figures in arms.items()
              if arm != "ft-ray" and "tokens_per_s" in figures}
    hf = arms.get("hf", {})
    print(json.dumps({
        "mode": args.mode, "device": device_name(args.device), "shape": args.shape, "model_settings": args.model_setting,
        "ft_ray_tokens_per_s": round(ours, 1),
        "ratios": ratios, "arms": arms, "baseline_tokens_per_s": hf.get("tokens_per_s"), "ratio": ratios.get("hf"),
        "ft_ray_peak_mem_mb": arms["ft-ray"]["peak_mem_mb"], "baseline_peak_mem_mb": hf.get("peak_mem_mb"),
        "mfu": median("ft-ray", "mfu"), "max_seq_len": args.max_seq_len, "micro_batch": args.micro_batch,
        "repeats": args.repeat, "passes": args.passes, "warmup_steps": args.warmup_steps, "profiled_steps": args.profile,
        "ft_ray_train_settings": args.train, "liger": runs["ft-ray"][0].get("liger")}))


def describe_arm(arm: str, figures: dict) -> str:
    """One arm's figures of one run, for the progress lines."""
    if "not_available" in figures:
        return f"{arm}: not available ({figures['not_available']})"
    return (f"{arm} {figures['tokens_per_s']:,.0f} tokens/s ({figures['steps']} steps, peak "
            f"{figures['peak_mem_mb']:,.0f} MiB, loss {figures.get('loss_first_last')})")


def add_device_option(parser: argparse.ArgumentParser) -> None:
    """`--device cpu|cuda`, read by `chosen_device`."""
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda when present")


def chosen_device(device: str | None) -> str:
    """The `--device` asked for, or cuda when present."""
    if device:
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def device_name(device: str) -> str:
    if device == "cuda":
        import torch

        return torch.cuda.get_device_name()
    return f"cpu ({platform.machine()}, {os.cpu_count()} cores)"


if __name__ == "__main__":
    main()
