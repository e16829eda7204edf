"""Each worker's peak memory while an fsdp or ZeRO-3 job builds and shards its model, with
rank 0 alone reading the weights (`distributed.fsdp.cpu_ram_efficient_loading`,
`distributed.deepspeed.zero3_init`) and without (every worker reads them whole): a random
Llama stored in bf16, a full fine-tune in fp32 (the case where each worker held a whole copy
of its own), two gloo ranks on this machine.

    python -m bench.load_memory [--strategy fsdp|zero3] [--layers 8] [--hidden 2048]

The last line is one JSON object with the figures (peak RSS in MiB and seconds per rank).
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist


def write_model(_: int, folder: Path, layers: int, hidden: int) -> None:
    """A random Llama (bf16 safetensors, the built-in tokenizer) in `folder`, its weights in
    billions in `folder`/billions. Run in a process of its own: a process's peak RSS passes
    to the processes it starts (Linux keeps it across exec), so the driver stays small."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from ft_ray.config import ModelConfig
    from ft_ray.models import load_tokenizer

    tokenizer = load_tokenizer(ModelConfig())
    config = LlamaConfig(hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
                         num_attention_heads=hidden // 128, num_key_value_heads=max(1, hidden // 512),
                         vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    (folder / "billions").write_text(str(sum(p.numel() for p in model.parameters()) / 1e9))


def build_and_shard(rank: int, port: int, folder: str, strategy: str, once: bool, out: str) -> None:
    """One of two ranks: build the job's model, then its engine; write this rank's peak RSS after
    each (DeepSpeed's engine allocates its optimizer's partitions at once, torch's AdamW at the
    first step)."""
    import os

    from ft_ray.config import config_from_dict
    from ft_ray.train.engines import build_engine
    from ft_ray.train.modeling import build_model
    from ft_ray.train.objectives import build_objective

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=timedelta(seconds=600))
    os.environ.update(LOCAL_RANK=str(rank), RANK=str(rank), WORLD_SIZE="2")  # as Ray Train sets them, for DeepSpeed
    sharded = ({"strategy": "fsdp", "fsdp": {"cpu_ram_efficient_loading": once}} if strategy == "fsdp" else
               {"strategy": "deepspeed", "deepspeed": {"stage": 3, "zero3_init": once}})
    config = config_from_dict({"method": "full", "data": {"train": "t.jsonl"}, "model": {"name_or_path": folder},
                               "distributed": sharded, "train": {"precision": "fp32", "warmup_steps": 0,
                                                                 "micro_batch_size": 1}})
    started = time.monotonic()
    model = build_model(config, folder)
    built = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
    build_engine(model, config, total_steps=1, objective=build_objective(config, model))
    dist.barrier()
    Path(out, f"{int(once)}-{rank}.json").write_text(json.dumps({
        "peak_rss_mib_model_built": built, "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024,
        "seconds": round(time.monotonic() - started, 1)}))
    dist.destroy_process_group()


def main() -> None:
    from ft_ray.train.trainer import free_port

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--strategy", choices=["fsdp", "zero3"], default="fsdp")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=2048)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as work:
        folder = Path(work, "model")
        torch.multiprocessing.start_processes(write_model, args=(folder, args.layers, args.hidden), nprocs=1,
                                              start_method="spawn")
        billions = float((folder / "billions").read_text())
        for once in (True, False):  # each in fresh processes: a peak is the process's own
            torch.multiprocessing.start_processes(build_and_shard, args=(
                free_port(), str(folder), args.strategy, once, work), nprocs=2, start_method="spawn")
        seen = {("rank0_loads" if once else "every_worker_loads"): [
            json.loads(Path(work, f"{int(once)}-{rank}.json").read_text()) for rank in (0, 1)] for once in (True, False)}
    print(json.dumps({"machine": platform.processor() or platform.machine(), "weights_billions": round(billions, 3),
                      "stored": "bf16", "trained": f"fp32 full fine-tune, {args.strategy}, 2 ranks", **seen}))


if __name__ == "__main__":
    main()
