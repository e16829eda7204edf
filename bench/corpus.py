"""A generated instruction corpus of mixed lengths for the data benchmarks (seeded, streamed
to disk, so it can be made larger than memory)."""

from __future__ import annotations

import json
import random
from pathlib import Path

WORDS = ("tent pitch trail camp stove lantern ridge river weather pack boots jacket order refund "
         "warranty shipping return store size colour strap zipper pole stake rain wind snow map "
         "compass torch battery kettle mug blanket pillow knife rope hook bag").split()


def record(rng: random.Random) -> dict:
    """An instruction record whose answer length follows a long-tailed distribution."""
    words = max(3, min(700, int(rng.lognormvariate(4.2, 0.8))))
    return {"instruction": " ".join(rng.choices(WORDS, k=rng.randint(5, 30))).capitalize() + "?",
            "input": "", "output": " ".join(rng.choices(WORDS, k=words)).capitalize() + "."}


def write_corpus(folder: Path, records: int | None = None, size_bytes: int | None = None, files: int = 8,
                 seed: int = 0) -> int:
    """JSONL files in `folder`, `records` records or about `size_bytes` in all; returns the record count."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    outs = [open(folder / f"part-{i:03d}.jsonl", "w", encoding="utf-8") for i in range(files)]
    written = size = 0
    try:
        while (records is not None and written < records) or (size_bytes is not None and size < size_bytes):
            line = json.dumps(record(rng)) + "\n"
            outs[written % files].write(line)
            written, size = written + 1, size + len(line)
    finally:
        for out in outs:
            out.close()
    return written
