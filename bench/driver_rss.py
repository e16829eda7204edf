"""Peak memory of the driver while `ft-ray prepare` streams a generated corpus, at two
corpus sizes: the driver only holds block references and counts, so its peak RSS must
stay flat as the corpus grows (target: under 1.5 GiB at 2 GB).

    python -m bench.driver_rss [--gb 2] [--small-gb 0.2]

The last line is one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

from bench.corpus import write_corpus


def peak_rss_of_prepare(corpus: Path, work: Path, max_seq_len: int) -> tuple[float, float, str]:
    """(peak RSS of the driver process in MiB, wall seconds, the driver's last lines)."""
    job = work / "job.yaml"
    job.write_text(json.dumps({"run_name": "rss", "model": {"max_seq_len": max_seq_len},
                               "data": {"train": str(corpus), "eval_fraction": 0.001},
                               "storage": {"path": str(work / "runs")}}))
    log = open(work / "prepare.log", "w")
    started = time.monotonic()
    driver = subprocess.Popen([sys.executable, "-m", "ft_ray", "prepare", str(job)], stdout=log,
                              stderr=subprocess.STDOUT)
    process, peak = psutil.Process(driver.pid), 0
    while driver.poll() is None:
        try:
            peak = max(peak, process.memory_info().rss)
        except psutil.NoSuchProcess:
            break
        time.sleep(0.2)
    log.close()
    tail = "\n".join((work / "prepare.log").read_text().splitlines()[-12:])
    if driver.returncode != 0:
        raise SystemExit(f"ft-ray prepare failed ({driver.returncode}):\n{tail}")
    return peak / 2 ** 20, time.monotonic() - started, tail


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--gb", type=float, default=2.0)
    parser.add_argument("--small-gb", type=float, default=0.2)
    parser.add_argument("--max-seq-len", type=int, default=2048)
    args = parser.parse_args()
    figures = {"benchmark": "driver_rss", "machine": f"{platform.machine()} {os.cpu_count()} cores"}
    for label, gb in (("small", args.small_gb), ("large", args.gb)):
        with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP")) as tmp:
            corpus = Path(tmp) / "corpus"
            records = write_corpus(corpus, size_bytes=int(gb * 2 ** 30), files=32)
            peak, wall, tail = peak_rss_of_prepare(corpus, Path(tmp), args.max_seq_len)
            print(f"{gb} GB corpus ({records:,} records): driver peak RSS {peak:,.0f} MiB, {wall:.0f} s\n{tail}",
                  flush=True)
            figures.update({f"{label}_corpus_gb": gb, f"{label}_records": records,
                            f"{label}_driver_peak_rss_mib": round(peak), f"{label}_wall_s": round(wall)})
    figures["rss_growth"] = round(figures["large_driver_peak_rss_mib"] / figures["small_driver_peak_rss_mib"], 3)
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
