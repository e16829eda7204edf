"""Read → tokenize → pack throughput of ft-ray's Ray Data pipeline against a plain
single-process loop with the same fast tokenizer on the same files, in one run.

    python -m bench.tokenize [--records 40000] [--max-seq-len 1024] [--repeat 3]

Prints tokens/s per core for both and their ratio (target: the pipeline at >= 0.8x the
raw tokenizer per core), and the packing efficiency (target >= 0.97); the last line is
one JSON object with the figures (medians of --repeat runs). For scale, the same plain
loop also runs on every core at once (one process per core, no Ray): how much of one
core's speed this machine keeps when all its cores are busy.
"""

from __future__ import annotations

import os
import sys

if sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
    sys.path.pop(0)  # run as a script: this file must not shadow the standard library's `tokenize`

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one core per tokenizer, in both arms


def baseline(files: list[Path], tokenizer, batch_size: int) -> int:
    """The usual hand-written loop: read lines, parse JSON, tokenize prompt and answer in batches."""
    from ft_ray.data.formats import alpaca_prompt

    tokens = 0
    for path in files:
        with open(path, encoding="utf-8") as f:
            lines = f.readlines()
        for start in range(0, len(lines), batch_size):
            texts = []
            for line in lines[start:start + batch_size]:
                record = json.loads(line)
                texts += [alpaca_prompt(record["instruction"], record["input"]), record["output"] + tokenizer.eos_token]
            tokens += sum(len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"])
    return tokens


def same_work_one_process(files: list[Path], tokenizer, batch_size: int, max_seq_len: int) -> int:
    """ft-ray's own per-record work (parse, segments, masks, best-fit packing) in one process,
    without Ray: separates what the work costs from what distributing it costs."""
    import numpy as np

    from ft_ray.data.records import encode_records
    from ft_ray.data.tokenize import pack_arrays

    tokens = 0
    for path in files:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
        for start in range(0, len(lines), batch_size):
            texts = lines[start:start + batch_size]
            batch = encode_records(texts, [""] * len(texts), "instruction", {}, tokenizer, max_seq_len, None)
            lengths = np.diff(batch.offsets)
            kept = np.concatenate([[0], np.cumsum(lengths[lengths > 0])])  # rejected records hold no tokens
            packed = pack_arrays(batch.ids, batch.labels, kept, np.zeros(len(kept) - 1, np.int64), max_seq_len,
                                 tokenizer.pad_token_id)
            tokens += int(packed["num_tokens"].sum())
    return tokens


_worker_tokenizer = None


def _load_worker_tokenizer() -> None:
    global _worker_tokenizer
    from ft_ray.config import ModelConfig
    from ft_ray.models import load_tokenizer

    _worker_tokenizer = load_tokenizer(ModelConfig())


def _baseline_part(files: list[Path]) -> int:
    from ft_ray.data.pipeline import TOKENIZE_BATCH

    return baseline(files, _worker_tokenizer, TOKENIZE_BATCH)


def pipeline(folder: Path, storage: Path, max_seq_len: int):
    from ft_ray.config import config_from_dict, resolve_paths
    from ft_ray.data.pipeline import build_datasets
    from ft_ray.models import load_tokenizer

    config = resolve_paths(config_from_dict({
        "model": {"max_seq_len": max_seq_len}, "data": {"train": str(folder), "eval_fraction": 0.01},
        "storage": {"path": str(storage)}}))
    return build_datasets(config, load_tokenizer(config.model), None)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--records", type=int, default=40000)
    parser.add_argument("--max-seq-len", type=int, default=1024)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--cpus", type=int, default=os.cpu_count())
    args = parser.parse_args()

    import multiprocessing

    import ray

    from bench.corpus import write_corpus
    from ft_ray.config import ModelConfig
    from ft_ray.data.pipeline import TOKENIZE_BATCH, sum_column
    from ft_ray.models import load_tokenizer

    # the plain loop on every core at once, no Ray: what this machine gives two busy cores
    # (a VM's cores rarely run at their one-core speed together); forked before Ray starts
    pool = multiprocessing.get_context("fork").Pool(args.cpus, initializer=_load_worker_tokenizer)
    ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false"}})
    ray.data.DataContext.get_current().enable_progress_bars = False
    tokenizer = load_tokenizer(ModelConfig())
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "corpus"
        write_corpus(folder, records=args.records)
        files = sorted(folder.glob("*.jsonl"))
        size_mb = sum(f.stat().st_size for f in files) / 2 ** 20
        # Ray workers start and import once: enough records for a read task per CPU (read tasks
        # take at least 4 MB each, a smaller warm-up would start one worker)
        write_corpus(Path(tmp) / "warmup", records=6000 * args.cpus, seed=1)
        pipeline(Path(tmp) / "warmup", Path(tmp) / "runs", args.max_seq_len)
        pool.map(_baseline_part, [files[:1]] * args.cpus)  # warm
        base_rates, same_rates, pipe_rates, efficiency, parallel_rates = [], [], [], [], []
        for _ in range(args.repeat):
            started = time.perf_counter()
            tokens = baseline(files, tokenizer, TOKENIZE_BATCH)
            base_rates.append(tokens / (time.perf_counter() - started))
            started = time.perf_counter()
            tokens = sum(pool.map(_baseline_part, [files[i::args.cpus] for i in range(args.cpus)]))
            parallel_rates.append(tokens / (time.perf_counter() - started) / args.cpus)
            started = time.perf_counter()
            same_rates.append(same_work_one_process(files, tokenizer, TOKENIZE_BATCH, args.max_seq_len)
                              / (time.perf_counter() - started))
            started = time.perf_counter()
            datasets, stats = pipeline(folder, Path(tmp) / "runs", args.max_seq_len)
            elapsed = time.perf_counter() - started
            pipe_tokens = stats.train_tokens + sum_column(datasets["eval"], "num_tokens")  # counted untimed
            pipe_rates.append(pipe_tokens / elapsed / args.cpus)
            efficiency.append(stats.packing_efficiency)
            print(f"baseline {base_rates[-1]:,.0f} tokens/s (1 core), {parallel_rates[-1]:,.0f} per core on "
                  f"{args.cpus} processes; ft-ray's work in one process "
                  f"{same_rates[-1]:,.0f} tokens/s; pipeline {pipe_rates[-1]:,.0f} tokens/s per core "
                  f"({args.cpus} cores, {pipe_tokens:,} tokens); packing efficiency {efficiency[-1]:.4f}", flush=True)
    ray.shutdown()
    pool.close()
    base, pipe = statistics.median(base_rates), statistics.median(pipe_rates)
    parallel = statistics.median(parallel_rates)
    print(json.dumps({"benchmark": "tokenize", "machine": f"{platform.machine()} {os.cpu_count()} cores",
                      "records": args.records, "corpus_mb": round(size_mb, 1), "cpus": args.cpus,
                      "baseline_tokens_per_s_per_core": round(base), "pipeline_tokens_per_s_per_core": round(pipe),
                      "ratio": round(pipe / base, 3),
                      "median_ratio_of_runs": round(statistics.median(p / b for p, b in zip(pipe_rates, base_rates)), 3),
                      "baseline_on_all_cores_per_core": round(parallel), "pipeline_vs_baseline_on_all_cores": round(pipe / parallel, 3),
                      "same_work_one_process_tokens_per_s": round(statistics.median(same_rates)), "packing_efficiency": statistics.median(efficiency),
                      "repeats": args.repeat}))


if __name__ == "__main__":
    main()
