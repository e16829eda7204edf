"""Columns a frozen model computes once for every packed row, before a run, so that its
training workers hold no copy of that model: the reference log-probs of DPO and KTO
(`preference.reference: precomputed`) and a distillation teacher's top-k logits
(`distill.teacher_logits: precomputed`). `prepare` stores them with the prepared data;
`objectives.with_precomputed` picks the pass a job needs.
"""

from __future__ import annotations

import contextlib
from typing import Any

import numpy as np
import torch

BATCH_COLUMNS = ("input_ids", "labels", "position_ids")  # what the model reads of a row


class BlockScorer:
    """A model actor (`with_columns`) adding columns to blocks of packed rows. A subclass
    loads its frozen model (`load`) and gives a micro batch's new columns (`columns_of`, under
    no_grad and the job's autocast) and those of no rows (`empty`)."""

    def __init__(self, job_json: str, board: Any = None):
        from ft_ray.config import JobConfig
        from ft_ray.train.engine_api import COMPUTE_DTYPES

        self.job = JobConfig.model_validate_json(job_json)
        gpu = self.job.distributed.use_gpu and torch.cuda.is_available()
        self.device = torch.device("cuda" if gpu else "cpu")
        if not gpu:
            torch.set_num_threads(max(1, int(self.job.distributed.cpus_per_worker)))
        self.autocast = COMPUTE_DTYPES.get(self.job.train.precision)
        self.board = board
        self.model = self.load()

    def load(self) -> Any:
        raise NotImplementedError

    def columns_of(self, batch: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def empty(self, width: int) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def __call__(self, rows: dict[str, Any]) -> dict[str, Any]:
        """`rows` (numpy columns) with the new columns, from one forward."""
        batch = {k: torch.as_tensor(rows[k], dtype=torch.long, device=self.device) for k in BATCH_COLUMNS}
        autocast = (torch.autocast(self.device.type, dtype=self.autocast) if self.autocast
                    else contextlib.nullcontext())
        with torch.no_grad(), autocast:
            return {**rows, **self.columns_of(batch)}

    def score(self, block: Any) -> tuple[Any, int]:
        """A block of packed rows with the new columns (a micro batch per forward, as the
        training workers batch), and its row count."""
        from ray.data.block import BlockAccessor

        rows = BlockAccessor.for_block(block).to_batch_format("numpy")
        count, size = len(rows["input_ids"]), self.job.train.micro_batch_size
        parts = [self({k: v[at:at + size] for k, v in rows.items()}) for at in range(0, count, size)]
        width = rows["input_ids"].shape[1] if count else self.job.model.max_seq_len
        added = self.empty(width) if not parts else {
            name: np.concatenate([part[name] for part in parts]) for name in parts[0] if name not in rows}
        if self.board is not None:
            self.board.add.remote("sequences", count)
        return BlockAccessor.batch_to_block({**rows, **added}), count


def with_columns(config: Any, datasets: dict[str, Any], scorer: type[BlockScorer], name: str,
                 what: str) -> dict[str, Any]:
    """The packed datasets with `scorer`'s columns, computed by model actors (as many as
    training workers, a GPU each on GPU jobs); `name` names the pass on the progress board
    and in the log, where `what` says what it computes.

    Each block goes to an actor by its place and comes back to the same place, so the rows
    keep their order by construction: a Ray Data actor pool keeps it only when the context it
    runs under says `preserve_order`, and a training run's samples per step follow from it.
    The driver holds block refs and row counts, never rows.
    """
    import ray
    import ray.data

    from ft_ray import progress
    from ft_ray.console import LOG

    gpu = config.distributed.use_gpu
    room = ray.cluster_resources().get("GPU" if gpu else "CPU", 1)
    blocks = [(split, block) for split, dataset in datasets.items() for block in dataset.to_arrow_refs()]
    total = sum(dataset.count() for dataset in datasets.values())
    count = max(1, min(config.distributed.max_workers, int(room), len(blocks)))
    LOG.info(f"{name}: {what} of {total} sequences, on {count} model actor(s)")
    actor = ray.remote(scorer).options(
        num_cpus=0 if gpu else config.distributed.cpus_per_worker, num_gpus=1 if gpu else 0,
        max_restarts=2, max_task_retries=2)  # scoring a block again gives the same block
    actors: list = []
    try:
        with progress.watching(name, total, "sequences",
                               lambda counts, _: (counts.get("sequences", 0), "")) as board:
            actors = [actor.remote(config.model_dump_json(), board) for _ in range(count)]
            calls = [actors[i % count].score.options(num_returns=2).remote(block)
                     for i, (_, block) in enumerate(blocks)]
            ray.get([rows for _, rows in calls])  # raises a failed actor's error here
    finally:  # their CPUs or GPUs are the training workers'
        for handle in actors:
            ray.kill(handle)
    return {split: ray.data.from_arrow_refs([scored for (of, _), (scored, _) in zip(blocks, calls) if of == split])
            for split in datasets}
