"""A preference objective's step with the LM head in chunks (`fast_paths.chunked_lm_head`, the
default) against the same step from the whole [tokens, vocabulary] logits (`fused_kernels:
none`): tokens/s and peak memory, in one run, each arm in its own process.

    python -m bench.preference --objective dpo --mode lora --shape 8b [--model-setting KEY=VALUE ...]

The pairs are the demo's preference pairs packed as ft-ray's pipeline packs them (prompt +
chosen, prompt + rejected, each a span of its own); the reference log-probs come with the batch
(`preference.reference: precomputed`, the default), taken from the model before its first step.
ft-ray's engine and objective run outside Ray (bench.train's ft-ray arm). The last line printed
is one JSON object: per arm tokens/s (median of the timed steps), peak memory, first/last loss.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from bench.train import (
    SHAPES, add_device_option, chosen_device, device_name, job_config, json_of, make_model, peak_memory_mb,
)

ARMS = {"chunked head": "auto", "whole logits": "none"}  # train.fused_kernels of each arm


def packed_pairs(config, tokenizer, rows: int) -> list[dict]:
    """`rows` packed rows of the demo's preference pairs (repeated as needed)."""
    import numpy as np

    from ft_ray.data.records import encode_records
    from ft_ray.data.tokenize import pack_arrays

    demo = Path(__file__).resolve().parents[1] / "ft_ray" / "assets" / "demo" / "preference-train.jsonl"
    lines = demo.read_text().splitlines()
    lines = lines * (1 + rows * config.model.max_seq_len // 200 // len(lines))  # a pair is about 200 tokens
    batch = encode_records(lines, [""] * len(lines), "auto", {}, tokenizer, config.model.max_seq_len, None)
    packed = pack_arrays(batch.ids, batch.labels, batch.offsets, np.arange(len(lines)), config.model.max_seq_len,
                         tokenizer.pad_token_id, roles=batch.roles)
    return [{k: packed[k][i] for k in ("input_ids", "labels", "position_ids", "roles")} for i in range(rows)]


def run_arm(args: argparse.Namespace) -> None:
    import numpy as np
    import torch

    from ft_ray.data.tokenize import IGNORE_INDEX
    from ft_ray.models import load_tokenizer
    from ft_ray.train.engines import build_engine
    from ft_ray.train.modeling import build_model
    from ft_ray.train.objectives import build_objective
    from ft_ray.train.preference import REF_COLUMN, token_logps_of

    config = job_config(args.mode, args.device, args.model, args.max_seq_len, args.micro_batch,
                        fused_kernels=ARMS[args.arm])
    config = config.model_copy(update={"objective": args.objective})
    rows = packed_pairs(config, load_tokenizer(config.model), args.micro_batch * args.steps)
    torch.manual_seed(config.train.seed)  # the same adapter init in both arms (as the training loop seeds)
    model = build_model(config, config.model.name_or_path)
    engine = build_engine(model, config, args.steps, build_objective(config, model))
    batches = []
    for i in range(args.steps):
        chunk = rows[i * args.micro_batch:(i + 1) * args.micro_batch]
        batch = {k: torch.from_numpy(np.stack([r[k] for r in chunk])).long().to(engine.device) for k in chunk[0]}
        with torch.no_grad():
            batch[REF_COLUMN] = token_logps_of(model, batch)  # the base's (the adapter starts at zero)
        batches.append(batch)
    rates, losses = [], []
    for i, batch in enumerate(batches):
        started = time.perf_counter()
        losses.append(engine.micro_step(batch, 1.0, True)[0])
        engine.step()
        if engine.device.type == "cuda":
            torch.cuda.synchronize()
        if i >= args.warmup_steps:
            rates.append(int((batch["labels"] != IGNORE_INDEX).sum()) / (time.perf_counter() - started))
    print(json.dumps({"tokens_per_s": round(statistics.median(rates)), "peak_mem_mb": round(peak_memory_mb(
        engine.device.type)), "loss_first_last": [round(losses[0], 4), round(losses[-1], 4)]}))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--objective", choices=["dpo", "orpo", "kto"], default="dpo")
    parser.add_argument("--mode", choices=["full", "lora", "qlora"], default="lora")
    add_device_option(parser)
    parser.add_argument("--shape", choices=["tiny", *SHAPES], default="8b")
    parser.add_argument("--model-setting", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--model-dir", help="where the random-init model is written (or reused, if there)")
    parser.add_argument("--max-seq-len", type=int, default=1024)
    parser.add_argument("--micro-batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup-steps", type=int, default=2)
    parser.add_argument("--arm", choices=list(ARMS), help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.device = chosen_device(args.device)
    if args.arm:
        return run_arm(args)
    with tempfile.TemporaryDirectory() as tmp:
        model = make_model(args.device, Path(args.model_dir or Path(tmp) / "model"), args.shape, args.model_setting)
        results = {}
        for arm in ARMS:
            results[arm] = json_of("bench.preference", [
                "--arm", arm, "--objective", args.objective, "--mode", args.mode, "--device", args.device,
                "--model", model, "--max-seq-len", str(args.max_seq_len), "--micro-batch", str(args.micro_batch),
                "--steps", str(args.steps), "--warmup-steps", str(args.warmup_steps)])
            print(f"{arm}: {results[arm]}", flush=True)
    chunked, whole = results["chunked head"], results["whole logits"]
    print(json.dumps({"objective": args.objective, "mode": args.mode, "device": device_name(args.device),
                      "shape": args.shape, "model_settings": args.model_setting,
                      "tokens_per_step": args.micro_batch * args.max_seq_len, "arms": results,
                      "speed_ratio": round(chunked["tokens_per_s"] / whole["tokens_per_s"], 3),
                      "memory_ratio": round(chunked["peak_mem_mb"] / whole["peak_mem_mb"], 3)}))


if __name__ == "__main__":
    sys.exit(main())
