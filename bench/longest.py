"""The longest single sequence each arm trains on this device: one training step (forward,
backward, optimizer) on one sequence, its length doubled from `--start` until the step runs out
of memory or `--limit` is reached.

    python -m bench.longest --mode qlora --shape 8b [--arms ft-ray,trl] [--start 8192] [--limit 262144]

Both arms recompute activations (gradient checkpointing: what a user training long sequences
turns on) and take the same model (bench.train's random-init shapes; `--model-setting` makes it
small enough to try on a CPU, where nothing runs out of memory and `--limit` ends the doubling;
`--memory-gib 80` caps a bigger card's allocator at an 80 GB card's memory).
Each arm runs in its own process (its peak memory its own): ft-ray's engine as bench.train's
ft-ray arm builds it, and TRL's SFTTrainer on the PEFT model of the Trainer-based arms. The last
line printed is one JSON object: per arm the longest length that trained, the peak memory of
each length tried, and what stopped the doubling.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench.train import (
    SHAPES, add_device_option, chosen_device, device_name, has_liger, hf_model, job_config, json_of, make_model,
    peak_memory_mb, stack_batch,
)


def sequence(length: int, vocab: int) -> dict:
    """One sequence of `length` token ids (a fixed pseudo-random draw), every token a label."""
    import numpy as np

    ids = np.random.default_rng(length).integers(3, vocab, size=length)
    return {"input_ids": ids, "labels": ids, "position_ids": np.arange(length)}


def lengths(start: int, limit: int) -> list[int]:
    out = [start]
    while out[-1] * 2 <= limit:
        out.append(out[-1] * 2)
    return out


def is_out_of_memory(error: BaseException) -> bool:
    import torch

    return isinstance(error, torch.OutOfMemoryError) or "out of memory" in str(error).lower()


def ft_ray_steps(config: Any, sizes: list[int], vocab: int) -> dict[int, float]:
    """Peak memory (MiB) of one ft-ray step at each length, until one runs out of memory."""
    from ft_ray.train.engines import build_engine
    from ft_ray.train.modeling import build_model
    from ft_ray.train.objectives import build_objective

    model = build_model(config, config.model.name_or_path)
    engine = build_engine(model, config, len(sizes), build_objective(config))
    return doubling(sizes, engine.device.type,
                    lambda n: (engine.micro_step(stack_batch([sequence(n, vocab)], engine.device), 1.0, True),
                               engine.step()))


def trl_steps(config: Any, sizes: list[int], vocab: int) -> dict[int, float]:
    """Peak memory (MiB) of one step of TRL's SFTTrainer at each length (one trainer per length,
    one model), until one runs out of memory."""
    import datasets
    from trl import SFTConfig, SFTTrainer

    model, tokenizer, device = hf_model(config)
    gpu = device == "cuda"

    def one_step(n: int) -> None:
        example = sequence(n, vocab)
        with tempfile.TemporaryDirectory() as out:
            args = SFTConfig(output_dir=out, per_device_train_batch_size=1, max_steps=1, max_length=n,
                             learning_rate=config.train.learning_rate, logging_strategy="no", save_strategy="no",
                             report_to=[], use_cpu=not gpu, bf16=gpu, gradient_checkpointing=True,
                             dataloader_num_workers=0, disable_tqdm=True,  # one sequence: nothing to pad
                             use_liger_kernel=gpu and has_liger(), optim="adamw_torch_fused")
            train = datasets.Dataset.from_list([{"input_ids": example["input_ids"].tolist(),
                                                 "labels": example["labels"].tolist()}])
            SFTTrainer(model=model, args=args, train_dataset=train, processing_class=tokenizer).train()

    return doubling(sizes, device, one_step)


def doubling(sizes: list[int], device: str, step: Any) -> dict[int, Any]:
    """{length: peak MiB} of the lengths that trained, then {length: "out of memory"} for the first
    that did not (the doubling stops there)."""
    import torch

    peaks: dict[int, Any] = {}
    for n in sizes:
        if device == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        try:
            step(n)
        except Exception as e:  # noqa: BLE001 - only running out of memory ends the doubling quietly
            if not is_out_of_memory(e):
                raise
            peaks[n] = "out of memory"
            break
        peaks[n] = round(peak_memory_mb(device), 1)
    return peaks


ARMS = {"ft-ray": ft_ray_steps, "trl": trl_steps}


def run_arm(args: argparse.Namespace) -> None:
    from ft_ray.models import load_tokenizer

    sizes = lengths(args.start, args.limit)
    if args.memory_gib and args.device == "cuda":  # a smaller card on a bigger one: the allocator's cap
        import torch

        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, args.memory_gib * 2 ** 30 / total))
    config = job_config(args.mode, args.device, args.model, sizes[-1], 1, train=["gradient_checkpointing=true"])
    vocab = len(load_tokenizer(config.model))
    try:
        figures = {"peak_mem_mb": ARMS[args.arm](config, sizes, vocab)}
    except ImportError as e:
        figures = {"not_available": f"{type(e).__name__}: {e}"}
    print(json.dumps(figures))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mode", choices=["full", "lora", "qlora"], default="qlora")
    add_device_option(parser)
    parser.add_argument("--shape", choices=list(SHAPES), default="8b")
    parser.add_argument("--model-setting", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--model-dir", help="where the random-init model is written (or reused, if there)")
    parser.add_argument("--arms", default="ft-ray,trl")
    parser.add_argument("--start", type=int, default=8192, help="the first length tried (tokens)")
    parser.add_argument("--limit", type=int, default=262144, help="no length past this is tried")
    parser.add_argument("--memory-gib", type=float, default=None, help=(
        "CUDA: cap the memory each arm may allocate (torch's per-process fraction), e.g. 80 for an 80 GB card"))
    parser.add_argument("--arm", choices=list(ARMS), help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.device = chosen_device(args.device)
    if args.arm:
        return run_arm(args)
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    if unknown := [a for a in arms if a not in ARMS]:
        raise SystemExit(f"--arms: unknown {unknown}; known: {', '.join(ARMS)}")
    with tempfile.TemporaryDirectory() as tmp:
        model = make_model(args.device, Path(args.model_dir or Path(tmp) / "model"), args.shape, args.model_setting)
        results = {}
        for arm in arms:
            try:
                results[arm] = json_of("bench.longest", [
                    "--arm", arm, "--mode", args.mode, "--device", args.device, "--model", model,
                    "--start", str(args.start), "--limit", str(args.limit),
                    *(["--memory-gib", str(args.memory_gib)] if args.memory_gib else [])])
            except RuntimeError as e:  # said, and the other arm still measured
                results[arm] = {"failed": str(e)[-2000:]}
            print(f"{arm}: {results[arm]}", flush=True)
    for figures in results.values():
        trained = [n for n, peak in figures.get("peak_mem_mb", {}).items() if peak != "out of memory"]
        figures["longest"] = max(int(n) for n in trained) if trained else None
        figures["stopped_by"] = ("out of memory" if "out of memory" in figures.get("peak_mem_mb", {}).values()
                                 else f"--limit {args.limit}" if trained else None)
    print(json.dumps({"mode": args.mode, "device": device_name(args.device), "memory_gib": args.memory_gib,
                      "shape": args.shape, "model_settings": args.model_setting, "gradient_checkpointing": True,
                      "arms": results}))


if __name__ == "__main__":
    sys.exit(main())
