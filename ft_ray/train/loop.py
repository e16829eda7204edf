"""The training loop each Ray Train worker runs.

build → restore → for each batch: step, log, maybe eval, maybe checkpoint.

Ray sees a report only on eval and checkpoint steps: `ray.train.report` blocks until the
controller takes the result (about 2 s when called back to back), so per-step metrics go
straight to `metrics.jsonl` / W&B from rank 0. Every rank reports on the same steps.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import torch

from ft_ray.config import JobConfig, TrainConfig, eval_set_metric
from ft_ray.data.pipeline import EVAL_SET
from ft_ray.models import model_source
from ft_ray.storage import MetricsLog, RunFolder
from ft_ray.tracking import Tracker
from ft_ray.train.checkpoint_io import TrainState, report, restore
from ft_ray.train.collectives import all_reduce_sum, worker_nodes
from ft_ray.train.engines import build_engine
from ft_ray.train.objectives import Objective, build_objective
from ft_ray.train.modeling import build_model

TRAIN_PIECE = "train_{}"  # the driver's fixed split of the training data, one piece per possible worker


@dataclass
class StepPlan:
    """How long the run is, fixed by the driver from the dataset size."""

    total_steps: int
    batches_per_epoch: int


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    import ray.train

    config = JobConfig.model_validate(loop_config["job"])
    plan = StepPlan(**loop_config["plan"])
    rank = ray.train.get_context().get_world_rank()
    torch.manual_seed(config.train.seed)
    if not config.distributed.use_gpu:
        torch.set_num_threads(max(1, int(config.distributed.cpus_per_worker)))

    if config.model.name_or_path.startswith("s3://"):  # the copy to this node, shown on the driver
        model_source(config.model, weights=True, board=loop_config.get("progress"))
    model = build_model(config, loop_config["base_model_path"])
    throughput = Throughput(config, model, ray.train.get_context().get_world_size())
    objective = build_objective(config, model)
    engine = build_engine(model, config, plan.total_steps, objective)
    run = RunFolder.for_job(config)
    state, resumed_from, skipped = restore(engine, run)
    tracker = Tracker(config, run, state.step if resumed_from else None,
                      enabled=rank == 0, total_steps=plan.total_steps, board=loop_config.get("progress"))
    nodes = worker_nodes()  # which machines ran this run, logged for the record
    if resumed_from:
        tracker.log({"step": state.step, "resumed_from": resumed_from, "worker_nodes": nodes,
                     "skipped_checkpoints": [f"{name}: {why}" for name, why in skipped]})
    eval_sets = {"": ray.train.get_dataset_shard("eval"),
                 **{name: ray.train.get_dataset_shard(EVAL_SET.format(name)) for name in loop_config["eval_sets"]}}

    if state.step == 0:
        evaluated = evaluate_all(engine, eval_sets, config, objective)
        state.eval_loss_initial = evaluated["eval_loss"]
        lowered(state, evaluated["eval_loss"], config.train)
        tracker.log({"step": 0, **evaluated, "worker_nodes": nodes})
        ray.train.report({"step": 0, **evaluated})

    accumulation = config.train.gradient_accumulation
    window = Window(throughput, objective)
    trace = MetricsLog(run, state.step if resumed_from else None,
                       enabled=config.train.trace_samples, name=f"samples-rank{rank}.jsonl")
    pieces = train_pieces(config, rank)
    epoch_batches = len(pieces) * plan.batches_per_epoch  # this rank's micro batches in an epoch
    train_steps = steps_of(batches(pieces, config, state), accumulation, config.rounds)
    patience = config.train.early_stopping_patience
    done = state.step >= plan.total_steps or out_of_patience(state, patience)
    for micro_batches in (train_steps if not done else ()):
        step_ids: list[int] = []
        for i, (batch, scale) in enumerate(zip(micro_batches, step_scales(engine.step_weights(micro_batches)))):
            window.add(*engine.micro_step(batch, scale, i == accumulation - 1), batch)
            step_ids += batch["seq_id"].tolist()
        grad_norm = engine.step()
        state.step += 1
        trace.log({"step": state.step, "seq_ids": step_ids})
        last = state.step == plan.total_steps
        if state.step % config.train.log_every == 0 or last:
            record = window.summarize(state.step, engine.lr, grad_norm)
            record["epoch"] = round(state.epoch + state.batch_in_epoch / epoch_batches, 3)  # epochs read so far
            state.train_tokens += record["tokens"]
            record["train_tokens"] = state.train_tokens
            tracker.log(record)
        checkpoint_due = state.step % config.train.checkpoint_every == 0 or last
        stop = False
        if state.step % config.train.eval_every == 0 or checkpoint_due:
            evaluated = evaluate_all(engine, eval_sets, config, objective)
            if patience:  # every rank sees the same (all-reduced) eval_loss, and stops at the same step
                best = lowered(state, evaluated["eval_loss"], config.train)
                stop = out_of_patience(state, patience)
                checkpoint_due = checkpoint_due or best or stop
            stopped = {"early_stopping": {"best_step": state.best_eval_step, "best_eval_loss": state.best_eval_loss,
                                          "evaluations_without_gain": state.evals_without_gain}} if stop else {}
            tracker.log({"step": state.step, **evaluated, **stopped})
            tracker.flush()
            trace.flush()
            report(engine, state, {"step": state.step, **evaluated, "train_tokens": state.train_tokens},
                   checkpoint_due, rank, run)
        if last or stop:
            break
    if resumed_from and done:
        # A finished run relaunched (a sweep restored after its driver died): tell Ray (and
        # Tune) where it ended, once, from every rank.
        ray.train.report({"step": state.step, **evaluate_all(engine, eval_sets, config, objective),
                          "train_tokens": state.train_tokens})
    trace.flush()
    tracker.finish()


def lowered(state: TrainState, eval_loss: float, train: TrainConfig) -> bool:
    """Early stopping's count: whether `eval_loss` is a new best (lower than the best so far
    by more than `train.early_stopping_min_delta`); else one more evaluation without gain."""
    if state.best_eval_loss is None or eval_loss < state.best_eval_loss - train.early_stopping_min_delta:
        state.best_eval_loss, state.best_eval_step, state.evals_without_gain = eval_loss, state.step, 0
        return True
    state.evals_without_gain += 1
    return False


def out_of_patience(state: TrainState, patience: int | None) -> bool:
    """`train.early_stopping_patience` evaluations in a row did not lower eval_loss: the run
    is done (a relaunch with more patience, or none, trains on)."""
    return patience is not None and state.evals_without_gain >= patience


def train_pieces(config: JobConfig, rank: int) -> dict[int, Any]:
    """This rank's share of the training data, by piece: the driver split it into one fixed
    piece per possible worker (`TRAIN_PIECE`); with fewer workers (an elastic range), rank r
    takes pieces r, r + world_size, ...

    Fixed pieces make the samples of each rank, in order, the same in every run; Ray's
    dynamic split hands blocks to whichever worker asks first, so it does not.
    """
    import ray.train

    world_size = ray.train.get_context().get_world_size()
    return {i: ray.train.get_dataset_shard(TRAIN_PIECE.format(i))
            for i in range(rank, config.distributed.max_workers, world_size)}


def batches(pieces: dict[int, Any], config: JobConfig, state: TrainState) -> Iterator[dict]:
    """Micro batches, epoch after epoch, starting at the saved data position.

    The packed dataset has a fixed order (seeded shuffle at preparation), each later epoch a
    fixed reshuffle of it (`epoch_order`), and fixed pieces per rank, so skipping the first
    `state.batch_in_epoch` batches resumes exactly where the checkpoint was taken.
    """
    while True:
        seen = 0
        for index, piece in pieces.items():
            for batch in piece.iter_torch_batches(batch_size=config.train.micro_batch_size,
                                                  prefetch_batches=config.train.prefetch_batches,
                                                  **epoch_order(config, state.epoch, index)):
                seen += 1
                if seen <= state.batch_in_epoch:
                    continue
                state.batch_in_epoch = seen
                yield model_inputs(batch)
        if seen == 0:
            raise RuntimeError("this worker's training shard is empty: use fewer workers or more data")
        state.epoch += 1
        state.batch_in_epoch = 0


def epoch_order(config: JobConfig, epoch: int, piece: int) -> dict[str, int]:
    """How a piece is read in an epoch (iter_torch_batches' local shuffle arguments): the
    first epoch in the prepared order; each later one shuffled within windows of
    `train.epoch_shuffle_buffer` sequences, seeded by the data's seed, the epoch and the piece,
    so a rerun or a resume reads the same order (the blocks come in order: `ingest_config`)."""
    window = config.train.epoch_shuffle_buffer
    if epoch == 0 or not window:
        return {}
    seed = np.random.SeedSequence([config.shuffle_seed % 2 ** 64, epoch, piece]).generate_state(1)[0]
    return {"local_shuffle_buffer_size": window, "local_shuffle_seed": int(seed)}


def steps_of(micro_batches: Iterator[dict], accumulation: int, times: int = 1) -> Iterator[list[dict]]:
    """The micro batches of each optimizer step (`train.gradient_accumulation` of them), each
    step's `times` times in a row (grpo.num_iterations: the objective samples a batch's answers
    at its first step and updates on them again at the next ones; the data position is the
    last one's: evaluations and checkpoints fall between such runs, config). An incomplete
    last step is left out."""
    while step := list(itertools.islice(micro_batches, accumulation)):
        if len(step) == accumulation:
            yield from itertools.repeat(step, times)


def step_scales(weights: list[float]) -> list[float]:
    """What each micro batch's mean loss is scaled by before its backward: its weight (target
    tokens, pairs, judged answers, GRPO's answer tokens: `Engine.step_weights`) over the mean
    weight of a micro batch of this step on every rank (a collective). The step's gradient is
    then the mean over every target token (pair...) of the step, however the micro batches and
    ranks split them (what Hugging Face's trainer fixed for gradient accumulation in 2024), not
    the mean of the micro batches' means, which gave a token in a micro batch of few targets
    more weight."""
    total, ranks = all_reduce_sum([float(sum(weights)), 1.0])
    return [w * ranks / total if total else 1.0 / len(weights) for w in weights]


def model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A batch as the model and the objective take it: integer columns (ids, labels,
    positions: int32 in storage) as int64, float columns (precomputed reference log-probs) as is."""
    return {k: v if v.is_floating_point() else v.long() for k, v in batch.items()}


class Throughput:
    """Tokens/s per worker and MFU from the model's FLOPs per token and the device peak."""

    def __init__(self, config: JobConfig, model: Any, world_size: int):
        from ft_ray.train.flops import flops_per_token, peak_flops

        self.world_size = world_size
        self.flops_per_token = flops_per_token(model, config.method, config.model.max_seq_len)
        self.peak = peak_flops(config.train.peak_tflops, config.distributed.use_gpu, config.train.precision)

    def figures(self, tokens_per_s: float) -> dict[str, float]:
        per_worker = tokens_per_s / self.world_size
        figures = {"tokens_per_s_per_worker": per_worker}
        if self.peak:
            figures["mfu"] = per_worker * self.flops_per_token / self.peak
        return figures


class Window:
    """Loss, the objective's metrics and token counts since the last log line, summed over
    all workers when read."""

    def __init__(self, throughput: Throughput, objective: Objective):
        self.throughput, self.names, self.objective = throughput, objective.metrics, objective
        self.reset()

    def reset(self) -> None:
        self.loss_sum, self.micro_batches, self.tokens, self.started = 0.0, 0, 0, time.monotonic()
        self.metric_sums, self.weight = [0.0] * len(self.names), 0

    def add(self, loss: float, metrics: dict[str, float], batch: dict[str, torch.Tensor]) -> None:
        self.loss_sum += loss
        self.micro_batches += 1
        self.tokens += int(batch["num_tokens"].sum())
        if self.names:
            self.metric_sums = [total + metrics[name] for total, name in zip(self.metric_sums, self.names)]
            self.weight += self.objective.weight(batch)

    def summarize(self, step: int, lr: float, grad_norm: float) -> dict[str, Any]:
        loss_sum, micro_batches, tokens, weight, *sums = all_reduce_sum(
            [self.loss_sum, self.micro_batches, self.tokens, self.weight, *self.metric_sums])
        elapsed = max(1e-9, time.monotonic() - self.started)
        self.reset()
        return {"step": step, "loss": loss_sum / max(1, micro_batches), "lr": lr, "grad_norm": grad_norm,
                **{name: total / max(1, weight) for name, total in zip(self.names, sums)},
                "tokens": int(tokens), "tokens_per_s": tokens / elapsed,
                **self.throughput.figures(tokens / elapsed)}


def evaluate_all(engine: Any, eval_sets: dict[str, Any], config: JobConfig, objective: Objective) -> dict[str, float]:
    """`evaluate` on data.eval (named "" in `eval_sets`: `eval_loss`, ...) and on each of
    data.eval_sets (`eval_<name>_loss`, ...)."""
    scores = {}
    for name, eval_set in eval_sets.items():
        evaluated = evaluate(engine, eval_set, config, objective)
        scores.update(evaluated if not name else
                      {eval_set_metric(name, key.removeprefix("eval_")): value for key, value in evaluated.items()})
    return scores


def evaluate(engine: Any, eval_set: Any, config: JobConfig, objective: Objective) -> dict[str, float]:
    """The mean loss over the whole eval set (per target token, or per pair for preference
    objectives) as `eval_loss`, and the objective's metrics as `eval_<name>`.

    Every worker reads the whole (small) eval set and scores every world_size-th batch: Ray's
    split of a dataset among workers drops rows to make the shares equal (7 packed eval rows
    on 2 workers: 6 were scored). Where the model's forward is a collective (each layer's
    weights gathered from the workers' shards: fsdp, ZeRO-3, a teacher sharded with it), a
    worker whose share is a batch short runs the last one again, unscored, beside the others'
    last forward (before, 5 eval batches on 2 fsdp workers waited for each other forever)."""
    import ray.train

    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    loss_sum, weight, sums = 0.0, 0, [0.0] * len(objective.metrics)
    on_device = lambda rows: model_inputs({k: torch.as_tensor(v, device=engine.device)  # noqa: E731
                                           for k, v in rows.items()})
    count, rows = 0, None
    for index, rows in enumerate(eval_set.iter_batches(batch_size=config.train.micro_batch_size,
                                                       batch_format="numpy")):
        count = index + 1
        if index % world_size != rank:
            continue
        batch_loss, batch_weight, metrics = engine.eval_loss_sum(on_device(rows))
        loss_sum, weight = loss_sum + batch_loss, weight + batch_weight
        sums = [total + metrics[name] for total, name in zip(sums, objective.metrics)]
    if config.sharded_weights and rank >= count % world_size > 0:
        engine.eval_loss_sum(on_device(rows))  # the last round's forward, left out
    loss_sum, weight, *sums = all_reduce_sum([loss_sum, weight, *sums])
    training_only = getattr(objective, "training_only", ())  # what an evaluation does not measure
    return {"eval_loss": loss_sum / max(1, weight),
            **{f"eval_{name}": total / max(1, weight) for name, total in zip(objective.metrics, sums)
               if name not in training_only}}


