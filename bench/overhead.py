"""What Ray Train costs per step: ft-ray's training run under Ray Train (1 worker, Ray Data
feeding it, metrics to metrics.jsonl) against the same engine and model stepping through
the same kind of packed batches in a plain process, in one run.

    python -m bench.overhead [--steps 60] [--repeat 3] [--device cpu|cuda]

On CPU: the built-in tiny Llama on the demo corpus at 512 tokens, 4 sequences per step. On CUDA
(`--device cuda`): a Llama-3.2-1B-shaped LoRA (random init, as in `bench.train`) on generated
instruction records at 2048 tokens, 8 sequences per step, bf16, where the step is GPU work and
Ray's processes do not compete with it for the same two cores.

Step time under Ray comes from the run's metrics.jsonl (one line per step: tokens and
tokens/s, so it includes waiting for the next batch); the plain loop times each step the
same way. Both go through the data epoch after epoch, each epoch ending in a partial batch.
The first steps (warm-up) and the last (eval, checkpoint) are left out. Two figures: the
median step time (target: under Ray within 3% of the plain one) and the whole run's tokens/s
over the same steps, which also counts the slower steps at epoch ends (Ray Data starts a new
iterator there). The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.train import add_device_option, chosen_device

WARMUP = 5


def job(folder: Path, steps: int, threads: int, device: str = "cpu", model_dir: str | None = None) -> Any:
    """The run both arms make: the demo corpus and tiny model on CPU, a 1B LoRA on CUDA."""
    from ft_ray.config import config_from_dict
    from ft_ray.models import ASSETS

    demo, gpu = ASSETS / "demo", device == "cuda"
    model: dict[str, Any] = {"max_seq_len": 512}
    train = str(demo / "train.jsonl")
    if gpu:
        from bench.corpus import write_corpus
        from bench.train import make_model

        write_corpus(folder / "corpus", records=800, files=1)
        train = str(folder / "corpus")
        model = {"name_or_path": make_model("cuda", Path(model_dir or folder / "model")), "max_seq_len": 2048}
    return config_from_dict({
        "run_name": "overhead", "model": model,
        "data": {"train": train, "eval": str(demo / "eval.jsonl")},
        "distributed": {"num_workers": 1, "cpus_per_worker": threads, "use_gpu": gpu},
        "train": {"max_steps": steps, "micro_batch_size": 8 if gpu else 4, "warmup_steps": 0, "log_every": 1,
                  "precision": "bf16" if gpu else "fp32",
                  "eval_every": 10 * steps, "checkpoint_every": 10 * steps},
        "storage": {"path": str(folder / "runs")}})


def ray_step_times(config: Any) -> list[tuple[float, int]]:
    """(seconds, tokens) of each optimizer step of a real `ft-ray train` run (1 worker), from metrics.jsonl."""
    from ft_ray.storage import RunFolder, read_metrics
    from ft_ray.train.trainer import run_training

    run_training(config, force_new=True)
    lines = [m for m in read_metrics(RunFolder.for_job(config)) if "tokens_per_s" in m]
    return [(m["tokens"] / m["tokens_per_s"], m["tokens"]) for m in lines[WARMUP:-1]]  # the last step also evals and saves


def plain_step_times(config: Any) -> list[tuple[float, int]]:
    """The same engine, model and packed batches in this process, no Ray: epoch after epoch,
    each ending in the same partial batch as the Ray run's."""
    import torch

    from bench.train import examples, stack_batch
    from ft_ray.data.tokenize import pack_examples
    from ft_ray.models import load_tokenizer
    from ft_ray.train.engines import build_engine
    from ft_ray.train.objectives import build_objective
    from ft_ray.train.modeling import build_model

    torch.set_num_threads(int(config.distributed.cpus_per_worker))
    tokenizer = load_tokenizer(config.model)
    data = examples(Path(config.data.train), tokenizer, config.model.max_seq_len, "auto")
    sequences = list(pack_examples(data, config.model.max_seq_len, tokenizer.pad_token_id))
    size, steps = config.train.micro_batch_size, config.train.max_steps
    engine = build_engine(build_model(config, config.model.name_or_path), config, steps, build_objective(config))
    epoch = [sequences[start:start + size] for start in range(0, len(sequences), size)]
    times = []
    started = time.perf_counter()
    for step in range(steps):
        chunk = epoch[step % len(epoch)]
        batch = stack_batch(chunk, engine.device)
        engine.micro_step(batch, 1.0, True)  # returns the loss as a float: the step ends on the device too
        engine.step()
        now = time.perf_counter()
        times.append((now - started, sum(int(s["num_tokens"]) for s in chunk)))
        started = now
    if engine.device.type == "cuda":  # the Ray worker that runs next shares the GPU
        del engine
        gc.collect()
        torch.cuda.empty_cache()
    return times[WARMUP:-1]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--repeat", type=int, default=3)
    add_device_option(parser)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads in both (the worker's CPUs); default: every core on CPU, 4 on CUDA")
    parser.add_argument("--model-dir", help="CUDA: where the random 1B model is written (or reused, if there)")
    args = parser.parse_args()
    args.device = chosen_device(args.device)
    args.threads = args.threads or (4 if args.device == "cuda" else os.cpu_count())

    import ray

    from bench.train import device_name
    from ft_ray.train.trainer import connect_ray

    ray_medians, plain_medians, ray_rates, plain_rates = [], [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        config = job(Path(tmp), args.steps, args.threads, args.device, args.model_dir)
        connect_ray(config)
        ray.data.DataContext.get_current().enable_progress_bars = False
        for _ in range(args.repeat):
            for steps, medians, rates in ((plain_step_times(config), plain_medians, plain_rates),
                                          (ray_step_times(config), ray_medians, ray_rates)):
                medians.append(statistics.median(seconds for seconds, _ in steps))
                rates.append(sum(tokens for _, tokens in steps) / sum(seconds for seconds, _ in steps))
            print(f"step time: plain process {plain_medians[-1] * 1000:.1f} ms, under Ray Train "
                  f"{ray_medians[-1] * 1000:.1f} ms ({ray_medians[-1] / plain_medians[-1] - 1:+.1%}); whole run: "
                  f"{plain_rates[-1]:,.0f} vs {ray_rates[-1]:,.0f} tokens/s ({plain_rates[-1] / ray_rates[-1] - 1:+.1%})",
                  flush=True)
    ray.shutdown()
    plain, under_ray = statistics.median(plain_medians), statistics.median(ray_medians)
    plain_rate, ray_rate = statistics.median(plain_rates), statistics.median(ray_rates)
    print(json.dumps({"plain_step_ms": round(plain * 1000, 2), "ray_train_step_ms": round(under_ray * 1000, 2),
                      "overhead": round(under_ray / plain - 1, 4),
                      "plain_tokens_per_s": round(plain_rate, 1), "ray_train_tokens_per_s": round(ray_rate, 1),
                      "throughput_overhead": round(plain_rate / ray_rate - 1, 4),
                      "steps": args.steps, "repeats": args.repeat,
                      "threads": args.threads, "device": device_name(args.device)}))


if __name__ == "__main__":
    main()
