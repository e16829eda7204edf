"""What Ray Train costs per step: ft-ray's training run under Ray Train (1 worker, Ray Data
feeding it, metrics to metrics.jsonl) against the same engine and model stepping through
the same kind of packed batches in a plain process, in one run.

    python -m bench.overhead [--steps 60] [--repeat 3]

Step time under Ray comes from the run's metrics.jsonl (one line per step: tokens and
tokens/s, so it includes waiting for the next batch); the plain loop times each step the
same way. The first steps (warm-up) and eval/checkpoint steps are left out. Target: the
Ray step time within 3% of the plain one. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

WARMUP = 5


def job(folder: Path, steps: int, threads: int) -> Any:
    from ft_ray.config import config_from_dict
    from ft_ray.models import ASSETS

    demo = ASSETS / "demo"
    return config_from_dict({
        "run_name": "overhead", "model": {"max_seq_len": 512},
        "data": {"train": str(demo / "train.jsonl"), "eval": str(demo / "eval.jsonl")},
        "distributed": {"num_workers": 1, "cpus_per_worker": threads},
        "train": {"max_steps": steps, "micro_batch_size": 4, "warmup_steps": 0, "log_every": 1,
                  "eval_every": 10 * steps, "checkpoint_every": 10 * steps},
        "storage": {"path": str(folder)}})


def ray_step_times(config: Any) -> list[float]:
    """Seconds per optimizer step of a real `ft-ray train` run (1 worker), from metrics.jsonl."""
    from ft_ray.storage import RunFolder, read_metrics
    from ft_ray.train.trainer import run_training

    run_training(config, force_new=True)
    lines = [m for m in read_metrics(RunFolder.for_job(config)) if "tokens_per_s" in m]
    return [m["tokens"] / m["tokens_per_s"] for m in lines[WARMUP:-1]]  # the last step also evals and saves


def plain_step_times(config: Any) -> list[float]:
    """The same engine, model and packed batches in this process, no Ray."""
    import numpy as np
    import torch

    from ft_ray.data.pipeline import tokenize_batch
    from ft_ray.data.tokenize import pack_examples
    from ft_ray.models import load_tokenizer
    from ft_ray.train.engines import build_engine
    from ft_ray.train.loop import build_model

    torch.set_num_threads(int(config.distributed.cpus_per_worker))
    tokenizer = load_tokenizer(config.model)
    lines = Path(config.data.train).read_text().splitlines()
    examples = [e for e in tokenize_batch(lines, [""] * len(lines), "auto", {}, tokenizer, config.model.max_seq_len, None)
                if isinstance(e, dict)]
    sequences = list(pack_examples(examples, config.model.max_seq_len, tokenizer.pad_token_id))
    size, steps = config.train.micro_batch_size, config.train.max_steps
    engine = build_engine(build_model(config, config.model.name_or_path), config, steps)
    times = []
    started = time.perf_counter()
    for step in range(steps):
        chunk = [sequences[(step * size + i) % len(sequences)] for i in range(size)]
        batch = {k: torch.from_numpy(np.stack([s[k] for s in chunk])).long() for k in ("input_ids", "labels", "position_ids")}
        engine.micro_step(batch, 1.0, True)
        engine.step()
        now = time.perf_counter()
        times.append(now - started)
        started = now
    return times[WARMUP:-1]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads in both (the worker's CPUs)")
    args = parser.parse_args()

    import ray

    from ft_ray.train.trainer import connect_ray

    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
    ray_medians, plain_medians = [], []
    with tempfile.TemporaryDirectory() as tmp:
        config = job(Path(tmp), args.steps, args.threads)
        connect_ray(config)
        ray.data.DataContext.get_current().enable_progress_bars = False
        for _ in range(args.repeat):
            plain_medians.append(statistics.median(plain_step_times(config)))
            ray_medians.append(statistics.median(ray_step_times(config)))
            print(f"step time: plain process {plain_medians[-1] * 1000:.1f} ms, under Ray Train "
                  f"{ray_medians[-1] * 1000:.1f} ms ({ray_medians[-1] / plain_medians[-1] - 1:+.1%})", flush=True)
    ray.shutdown()
    plain, under_ray = statistics.median(plain_medians), statistics.median(ray_medians)
    print(json.dumps({"plain_step_ms": round(plain * 1000, 2), "ray_train_step_ms": round(under_ray * 1000, 2),
                      "overhead": round(under_ray / plain - 1, 4), "steps": args.steps, "repeats": args.repeat,
                      "threads": args.threads, "device": f"cpu ({os.cpu_count()} cores)"}))


if __name__ == "__main__":
    main()
