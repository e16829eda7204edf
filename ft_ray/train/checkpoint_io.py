"""Saving a worker's state as a Ray Train checkpoint (its manifest written last, by rank 0)
and restoring the newest complete one on (re)start. Which checkpoint is trusted is decided
in `checkpoints`; this module moves the files."""

from __future__ import annotations

import json
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ft_ray.console import LOG
from ft_ray.storage import RunFolder
from ft_ray.train.checkpoints import (MANIFEST, STATE_FILE, digest_problem, file_digests, list_checkpoints,
                                      manifest_json, manifest_problem, next_checkpoint_name)
from ft_ray.train.collectives import all_reduce_sum, broadcast, gather_dicts


@dataclass
class TrainState:
    """Where the run is; saved in every checkpoint so a resume continues exactly here."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0  # micro batches of this epoch already consumed
    train_tokens: int = 0
    eval_loss_initial: float | None = None
    world_size: int = 1  # of the run that wrote the checkpoint
    best_eval_loss: float | None = None  # early stopping: the lowest eval_loss so far, at best_eval_step
    best_eval_step: int = 0
    evals_without_gain: int = 0  # evaluations since, none lower by train.early_stopping_min_delta


def report(engine: Any, state: TrainState, metrics: dict, with_checkpoint: bool, rank: int,
           run: RunFolder) -> None:
    """Report metrics to Ray; on checkpoint steps attach the saved state, and when every rank
    has uploaded its files, rank 0 writes the checkpoint's manifest, last."""
    import ray.train

    if not with_checkpoint:
        ray.train.report(metrics)
        return
    name = broadcast(next_checkpoint_name(list_checkpoints(run.fs, run.root), state.step) if rank == 0 else None)
    world_size = ray.train.get_context().get_world_size()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        engine.save(folder, rank)  # a collective for sharded engines: every rank calls it
        if rank == 0:
            state.world_size = world_size
            (folder / STATE_FILE).write_text(json.dumps(asdict(state)))
        attach = rank == 0 or engine.saves_on_every_rank  # Ray merges every rank's files into one folder
        files = gather_dicts(file_digests(folder) if attach else {})
        checkpoint = ray.train.Checkpoint.from_directory(tmp) if attach else None
        ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=name)  # uploads before it returns
    all_reduce_sum([0.0])  # a barrier: every rank's upload is done
    if rank == 0:
        run.write_text(f"{name}/{MANIFEST}", manifest_json(files, state.step, world_size))


def zero_shards_problem(zero_stage: int, saved_by: int, world_size: int, where: str) -> str | None:
    """Sharded (ZeRO 1-3) state cannot be loaded by another number of workers: what to say
    when it would be, else None."""
    if zero_stage == 0 or saved_by == world_size:
        return None
    return (f"{where} holds ZeRO shards of {saved_by} workers; this run has {world_size}. "
            f"Resume with distributed.num_workers={saved_by}, or start a new run_name from the "
            f"exported weights (ft-ray export {where} --out DIR, then model.name_or_path: DIR).")


def check_world_size(engine: Any, state: TrainState, world_size: int, where: str) -> None:
    """The workers' check (the driver's is `trainer.check_same_job`).

    Raises:
        RuntimeError: saying which worker count the checkpoint needs and how to go on.
    """
    zero_stage = getattr(engine, "zero_stage", 0) if engine.saves_on_every_rank else 0
    problem = zero_shards_problem(zero_stage, state.world_size, world_size, where)
    if problem:
        raise RuntimeError(problem)


def restore(engine: Any, run: RunFolder) -> tuple[TrainState, str | None, list[tuple[str, str]]]:
    """Load the newest complete checkpoint of this run, if there is one.

    Every rank reads the same storage and so picks the same checkpoint. Incomplete ones
    (no manifest, a file missing, truncated or changed) are skipped with a warning. When
    none is complete the run starts from step 0: the driver refused a relaunch onto only
    incomplete checkpoints (`check_same_job`), so these are this run's own, cut short by
    the failure that restarted its workers (e.g. the store went away during the first upload).

    Returns:
        (the state to continue from, the checkpoint's URI or None for a fresh start,
        the skipped checkpoints with the reason of each).
    """
    import ray.train

    world_size = ray.train.get_context().get_world_size()
    candidates = list_checkpoints(run.fs, run.root)
    skipped: list[tuple[str, str]] = []
    for candidate in candidates:
        path = run.path(candidate.name)
        problem = manifest_problem(run.fs, path)
        if problem is None:
            with ray.train.Checkpoint(path, run.fs).as_directory() as folder:
                problem = digest_problem(Path(folder))
                if problem is None:
                    state = TrainState(**json.loads((Path(folder) / STATE_FILE).read_text()))
                    check_world_size(engine, state, world_size, run.uri_of(candidate.name))
                    engine.load(Path(folder))
                    break
        LOG.warning(f"skipping checkpoint {run.uri_of(candidate.name)}: {problem}")
        skipped.append((candidate.name, problem))
    else:
        if skipped:
            LOG.warning(f"no complete checkpoint in {run.uri} (this run's own were cut short): "
                        "starting from step 0")
        return TrainState(), None, []
    if state.world_size != world_size:
        # Shards differ with the worker count: keep the share of the epoch already seen.
        state.batch_in_epoch = state.batch_in_epoch * state.world_size // world_size
        state.world_size = world_size
    return state, run.uri_of(candidate.name), skipped
