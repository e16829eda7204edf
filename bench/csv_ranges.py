"""Read → tokenize → pack of one large CSV file by ft-ray's pipeline, read whole by one task
against read in ranges that start at rows (found by one task parsing the file once), in one
run on the same file: same records and tokens, and the wall time of each.

    python -m bench.csv_ranges [--records 100000] [--repeat 3]

The last line is one JSON object with the medians.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

from ft_ray.models import ASSETS

WHOLE = (1 << 40, 1 << 40)  # a read span past any file: every file one task


def write_csv(path: Path, records: int) -> None:
    demo = [json.loads(line) for line in (ASSETS / "demo" / "train.jsonl").read_text().splitlines()]
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["instruction", "input", "output"])
        for i in range(records):
            record = demo[i % len(demo)]
            writer.writerow([record["instruction"], f"{record['input']} (#{i})", record["output"]])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()

    import ray

    from ft_ray.config import config_from_dict
    from ft_ray.data import pipeline, sources
    from ft_ray.models import load_tokenizer

    work = Path(tempfile.mkdtemp(prefix="ft-ray-csv-"))
    big = work / "big.csv"
    write_csv(big, args.records)
    config = config_from_dict({"model": {"max_seq_len": 1024}, "storage": {"path": str(work / "runs")},
                               "data": {"train": str(big), "eval": str(ASSETS / "demo" / "eval.jsonl")}})
    tokenizer = load_tokenizer(config.model)
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    spans = {"whole": WHOLE, "ranges": (sources.RANGE_MIN_BYTES, sources.RANGE_MAX_BYTES)}
    seconds: dict[str, list[float]] = {arm: [] for arm in spans}
    outcome = {}
    for _ in range(args.repeat):
        for arm, (low, high) in spans.items():
            sources.RANGE_MIN_BYTES, sources.RANGE_MAX_BYTES = low, high
            started = time.monotonic()
            _, stats = pipeline.build_datasets(config, tokenizer, None)
            seconds[arm].append(time.monotonic() - started)
            outcome[arm] = (stats.records_read, stats.train_tokens)
            print(f"{arm}: {seconds[arm][-1]:.1f} s, {stats.records_read} records, {stats.train_tokens} tokens",
                  flush=True)
    assert outcome["whole"] == outcome["ranges"], outcome
    medians = {arm: round(statistics.median(times), 2) for arm, times in seconds.items()}
    print(json.dumps({"csv_mib": round(big.stat().st_size / 2 ** 20, 1), "records": args.records,
                      "cpus": os.cpu_count(), "machine": platform.processor() or platform.machine(),
                      "seconds": medians, "speedup": round(medians["whole"] / medians["ranges"], 2)}))


if __name__ == "__main__":
    main()
