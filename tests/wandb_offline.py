"""Read what W&B offline mode wrote: the run's config and logged history.

The `.wandb` file is a LevelDB-style log (7-byte W&B header, 32 KiB blocks, records of
crc32/length/type + payload) of protobuf `Record`s; wandb 0.31 reads it only from Go.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

BLOCK = 32 * 1024
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def _payloads(data: bytes) -> Iterator[bytes]:
    assert data[:4] == b":W&B", "not a W&B run file"
    pos, chunks = 7, []
    while pos + 7 <= len(data):
        left = BLOCK - pos % BLOCK
        if left < 7:
            pos += left
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        if kind == 0:
            pos += left
            continue
        payload, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == FULL:
            yield payload
        elif kind == FIRST:
            chunks = [payload]
        elif kind == MIDDLE:
            chunks.append(payload)
        elif kind == LAST:
            yield b"".join(chunks + [payload])


def read_offline_run(run_file: Path) -> dict:
    """{"config": {...}, "history": [{key: value}, ...], "group": str, "job_type": str, "raw": bytes}
    of one offline run."""
    from wandb.proto import wandb_internal_pb2 as pb

    raw = Path(run_file).read_bytes()
    config, history, group, job_type = {}, [], "", ""
    for payload in _payloads(raw):
        record = pb.Record()
        record.ParseFromString(payload)
        kind = record.WhichOneof("record_type")
        if kind == "history":
            history.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item})
        elif kind == "config":
            config.update({i.key: json.loads(i.value_json) for i in record.config.update})
        elif kind == "run":
            config.update({i.key: json.loads(i.value_json) for i in record.run.config.update})
            group, job_type = record.run.run_group or group, record.run.job_type or job_type
    return {"config": config, "history": history, "group": group, "job_type": job_type, "raw": raw}
