"""The training loop each Ray Train worker runs.

build → restore → for each batch: step, log, maybe eval, maybe checkpoint.

Ray sees a report only on eval and checkpoint steps: `ray.train.report` blocks until the
controller takes the result (about 2 s when called back to back), so per-step metrics go
straight to `metrics.jsonl` / W&B from rank 0. Every rank reports on the same steps.
"""

from __future__ import annotations

import json
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator

import torch

from ft_ray.config import JobConfig
from ft_ray.storage import MetricsLog, RunFolder
from ft_ray.tracking import Tracker
from ft_ray.train.checkpoints import (MANIFEST, STATE_FILE, digest_problem, file_digests, list_checkpoints,
                                      manifest_json, manifest_problem, next_checkpoint_name)
from ft_ray.train.engines import COMPUTE_DTYPES, build_engine
from ft_ray.train.fast_paths import fuse_lora_layers, recompute_swiglu_product, residual_in_compute_dtype

TRAIN_PIECE = "train_{}"  # the driver's fixed split of the training data, one piece per possible worker


@dataclass
class StepPlan:
    """How long the run is, fixed by the driver from the dataset size."""

    total_steps: int
    batches_per_epoch: int


@dataclass
class TrainState:
    """Where the run is; saved in every checkpoint so a resume continues exactly here."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0  # micro batches of this epoch already consumed
    train_tokens: int = 0
    eval_loss_initial: float | None = None
    world_size: int = 1  # of the run that wrote the checkpoint


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    import ray.train

    config = JobConfig.model_validate(loop_config["job"])
    plan = StepPlan(**loop_config["plan"])
    rank = ray.train.get_context().get_world_rank()
    torch.manual_seed(config.train.seed)
    if not config.distributed.use_gpu:
        torch.set_num_threads(max(1, int(config.distributed.cpus_per_worker)))

    model = build_model(config, loop_config["base_model_path"])
    throughput = Throughput(config, model, ray.train.get_context().get_world_size())
    engine = build_engine(model, config, plan.total_steps)
    run = RunFolder.for_job(config)
    state, resumed_from, skipped = restore(engine, run)
    tracker = Tracker(config, run, state.step if resumed_from else None,
                      enabled=rank == 0, total_steps=plan.total_steps)
    nodes = worker_nodes()  # which machines ran this run, logged for the record
    if resumed_from:
        tracker.log({"step": state.step, "resumed_from": resumed_from, "worker_nodes": nodes,
                     "skipped_checkpoints": [f"{name}: {why}" for name, why in skipped]})
    eval_shard = ray.train.get_dataset_shard("eval")

    if state.step == 0:
        state.eval_loss_initial = evaluate(engine, eval_shard, config)
        tracker.log({"step": 0, "eval_loss": state.eval_loss_initial, "worker_nodes": nodes})
        ray.train.report({"step": 0, "eval_loss": state.eval_loss_initial})

    accumulation = config.train.gradient_accumulation
    window = Window(throughput)
    micro = 0
    trace = MetricsLog(run, state.step if resumed_from else None,
                       enabled=config.train.trace_samples, name=f"samples-rank{rank}.jsonl")
    step_ids: list[int] = []
    train_batches = batches(train_pieces(config, rank), config, plan, state)
    for batch in (train_batches if state.step < plan.total_steps else ()):
        micro += 1
        sync = micro % accumulation == 0
        window.add(engine.micro_step(batch, 1.0 / accumulation, sync), int(batch["num_tokens"].sum()))
        step_ids += batch["seq_id"].tolist()
        if not sync:
            continue
        grad_norm = engine.step()
        state.step += 1
        trace.log({"step": state.step, "seq_ids": step_ids})
        step_ids = []
        last = state.step == plan.total_steps
        if state.step % config.train.log_every == 0 or last:
            record = window.summarize(state.step, engine.lr, grad_norm)
            state.train_tokens += record["tokens"]
            record["train_tokens"] = state.train_tokens
            tracker.log(record)
        checkpoint_due = state.step % config.train.checkpoint_every == 0 or last
        if state.step % config.train.eval_every == 0 or checkpoint_due:
            eval_loss = evaluate(engine, eval_shard, config)
            tracker.log({"step": state.step, "eval_loss": eval_loss})
            tracker.flush()
            trace.flush()
            report(engine, state, {"step": state.step, "eval_loss": eval_loss,
                                   "train_tokens": state.train_tokens}, checkpoint_due, rank, run)
        if last:
            break
    if resumed_from and state.step >= plan.total_steps:
        # A finished run relaunched (a sweep restored after its driver died): tell Ray (and
        # Tune) where it ended, once, from every rank.
        ray.train.report({"step": state.step, "eval_loss": evaluate(engine, eval_shard, config),
                          "train_tokens": state.train_tokens})
    trace.flush()
    tracker.finish()


def build_model(config: JobConfig, base_model_path: str) -> Any:
    """The base model (4-bit for QLoRA), wrapped with LoRA unless the method is a full fine-tune."""
    from ft_ray.models import apply_lora, load_base_model, load_quantized_model

    compute_dtype = COMPUTE_DTYPES.get(config.train.precision)  # None: fp32, no autocast
    if config.method == "qlora":
        model = load_quantized_model(config.model, config.quantization, config.train.gradient_checkpointing)
    else:
        # a frozen base (LoRA) is kept in the 16-bit compute dtype: fp32 would cost twice the
        # memory and a cast of every weight in every autocast forward; trained weights stay fp32
        model = load_base_model(config.model, dtype=compute_dtype if config.trains_adapter else None)
        if config.train.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.enable_input_require_grads()  # frozen embeddings would cut the graph for LoRA
    use_fused_kernels(model, config)
    if compute_dtype and not config.train.fp32_residual:
        residual_in_compute_dtype(model, compute_dtype)
    zero3 = config.distributed.strategy == "deepspeed" and config.distributed.deepspeed.stage == 3
    if config.method == "full" and config.train.recompute_swiglu and not zero3:
        recompute_swiglu_product(model)  # ZeRO-3 gathers down_proj's weight only inside down_proj's forward
    if config.data.pack and config.model.attn_implementation == "sdpa":
        from ft_ray.train.attention import register

        model.set_attn_implementation(register())  # per-example attention spans in packed batches
    if config.trains_adapter:
        model = apply_lora(model, config.lora, base_model_path)
        if config.train.fused_kernels != "none" and not zero3:
            fuse_lora_layers(model)
    model.config.use_cache = False
    if config.train.compile:
        model.compile()  # in place: the module (and save_pretrained) stay as they are
    return model


def use_fused_kernels(model: Any, config: JobConfig) -> bool:
    """Swap in liger-kernel's fused layers (RMSNorm, RoPE, SwiGLU, linear + cross-entropy)
    on CUDA; returns whether it did. `fused_kernels: liger` insists (an error if it cannot)."""
    choice = config.train.fused_kernels
    if choice == "none" or not (config.distributed.use_gpu and torch.cuda.is_available()):
        if choice == "liger":
            raise RuntimeError("train.fused_kernels: liger needs a CUDA GPU (distributed.use_gpu: true); use auto")
        return False
    try:
        from liger_kernel.transformers import _apply_liger_kernel_to_instance
    except ImportError:
        if choice == "liger":
            raise RuntimeError("train.fused_kernels: liger needs the liger-kernel package (pip install ft-ray[gpu])")
        return False
    try:
        _apply_liger_kernel_to_instance(model=model)
    except Exception as e:  # a model type or transformers release this liger does not know
        if choice == "liger":
            raise RuntimeError(f"train.fused_kernels: liger could not patch this model: {e}") from e
        warnings.warn(f"train.fused_kernels auto: liger-kernel not used ({e}); plain torch layers")
        return False
    return True


def train_pieces(config: JobConfig, rank: int) -> list[Any]:
    """This rank's share of the training data: the driver split it into one fixed piece per
    possible worker (`trainer.TRAIN_PIECE`); with fewer workers (an elastic range), rank r
    takes pieces r, r + world_size, ...

    Fixed pieces make the samples of each rank, in order, the same in every run; Ray's
    dynamic split hands blocks to whichever worker asks first, so it does not.
    """
    import ray.train

    world_size = ray.train.get_context().get_world_size()
    return [ray.train.get_dataset_shard(TRAIN_PIECE.format(i))
            for i in range(rank, config.distributed.max_workers, world_size)]


def batches(pieces: list[Any], config: JobConfig, plan: StepPlan, state: TrainState) -> Iterator[dict]:
    """Micro batches, epoch after epoch, starting at the saved data position.

    The packed dataset has a fixed order (seeded shuffle at preparation) and fixed pieces
    per rank, so skipping the first `state.batch_in_epoch` batches resumes exactly where the
    checkpoint was taken.
    """
    while True:
        seen = 0
        for piece in pieces:
            for batch in piece.iter_torch_batches(batch_size=config.train.micro_batch_size, dtypes=torch.long,
                                                  prefetch_batches=config.train.prefetch_batches):
                seen += 1
                if seen <= state.batch_in_epoch:
                    continue
                state.batch_in_epoch = seen
                yield batch
        if seen == 0:
            raise RuntimeError("this worker's training shard is empty: use fewer workers or more data")
        state.epoch += 1
        state.batch_in_epoch = 0


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
    """Loss and token counts since the last log line, summed over all workers when read."""

    def __init__(self, throughput: Throughput):
        self.throughput = throughput
        self.reset()

    def reset(self) -> None:
        self.loss_sum, self.micro_batches, self.tokens, self.started = 0.0, 0, 0, time.monotonic()

    def add(self, loss: float, tokens: int) -> None:
        self.loss_sum += loss
        self.micro_batches += 1
        self.tokens += tokens

    def summarize(self, step: int, lr: float, grad_norm: float) -> dict[str, Any]:
        loss_sum, micro_batches, tokens = all_reduce_sum([self.loss_sum, self.micro_batches, self.tokens])
        elapsed = max(1e-9, time.monotonic() - self.started)
        self.reset()
        return {"step": step, "loss": loss_sum / max(1, micro_batches), "lr": lr, "grad_norm": grad_norm,
                "tokens": int(tokens), "tokens_per_s": tokens / elapsed,
                **self.throughput.figures(tokens / elapsed)}


def evaluate(engine: Any, shard: Any, config: JobConfig) -> float:
    """Mean loss per target token over the whole eval set (all workers' shards)."""
    loss_sum, targets = 0.0, 0
    for batch in shard.iter_torch_batches(batch_size=config.train.micro_batch_size, dtypes=torch.long):
        batch_loss, batch_targets = engine.eval_loss_sum(batch)
        loss_sum, targets = loss_sum + batch_loss, targets + batch_targets
    loss_sum, targets = all_reduce_sum([loss_sum, targets])
    return loss_sum / max(1, targets)


def worker_nodes() -> list[str]:
    """The Ray node id of every rank, in rank order (a collective)."""
    import ray
    import torch.distributed as dist

    node = ray.get_runtime_context().get_node_id()
    if not (dist.is_available() and dist.is_initialized()):
        return [node]
    nodes: list = [None] * dist.get_world_size()
    dist.all_gather_object(nodes, node)
    return nodes


def all_reduce_sum(values: list[float]) -> list[float]:
    """Sum small numbers over workers (a sync point: every rank must call it)."""
    import torch.distributed as dist

    tensor = torch.tensor(values, dtype=torch.float64)
    if dist.is_available() and dist.is_initialized():
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
        tensor = tensor.to(device)
        dist.all_reduce(tensor)
    return tensor.cpu().tolist()


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


def broadcast(value: Any) -> Any:
    """Rank 0's value on every rank (a collective)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_dicts(part: dict) -> dict:
    """Every rank's dict merged (a collective); the same on every rank."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return dict(part)
    parts: list = [None] * dist.get_world_size()
    dist.all_gather_object(parts, part)
    return {key: value for p in parts for key, value in p.items()}


def check_world_size(engine: Any, state: TrainState, world_size: int, where: str) -> None:
    """Sharded (ZeRO) state cannot be loaded by a different number of workers.

    Raises:
        RuntimeError: saying which worker count the checkpoint needs and how to go on.
    """
    if engine.saves_on_every_rank and getattr(engine, "zero_stage", 0) > 0 and state.world_size != world_size:
        raise RuntimeError(
            f"{where} holds ZeRO shards of {state.world_size} workers; this run has {world_size}. "
            f"Resume with distributed.num_workers={state.world_size}, or start a new run_name from the "
            f"exported weights (ft-ray export {where} --out DIR, then model.name_or_path: DIR).")


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
        print(f"[ft-ray] warning: skipping checkpoint {run.uri_of(candidate.name)}: {problem}", flush=True)
        skipped.append((candidate.name, problem))
    else:
        if skipped:
            print(f"[ft-ray] warning: no complete checkpoint in {run.uri} (this run's own were cut short): "
                  "starting from step 0", flush=True)
        return TrainState(), None, []
    if state.world_size != world_size:
        # Shards differ with the worker count: keep the share of the epoch already seen.
        state.batch_in_epoch = state.batch_in_epoch * state.world_size // world_size
        state.world_size = world_size
    return state, run.uri_of(candidate.name), skipped
