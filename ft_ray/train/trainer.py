"""The driver side of a run: connect to Ray, prepare data and the base model, run the
Ray Train `TorchTrainer`, and write `summary.json`.

Relaunching the same job (same `storage.path` and `run_name`) resumes: Ray Train finds
the run's checkpoint history in storage and hands the latest checkpoint to the workers.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import statistics
import tempfile
import threading
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Iterator

import yaml

from ft_ray import progress
from ft_ray.config import (InputError, JobConfig, StorageConfig, dump_yaml, eval_set_metric, resume_changes,
                           with_defaults)
from ft_ray.console import LOG
from ft_ray.data.pipeline import EVAL_SET, DataError, DataStats, stats_table
from ft_ray.data.prepared import data_files, datasets_for, location
from ft_ray.storage import MODEL_COPY, RunFolder, StorageError, filesystem, read_metrics
from ft_ray.tracking import check_wandb_login
from ft_ray.train.checkpoint_io import zero_shards_problem
from ft_ray.train.checkpoints import (MANIFEST, best_of, complete_checkpoints, list_checkpoints,
                                      no_complete_checkpoint, set_aside_stale_snapshot)
from ft_ray.train.loop import TRAIN_PIECE, StepPlan, train_loop_per_worker
from ft_ray.train.objectives import with_precomputed
from ft_ray.train.placement import check_placement


def connect_ray(config: JobConfig, parallel_runs: int = 1, gpus: bool = True) -> bool:
    """Join the cluster named by RAY_ADDRESS (set by `ray job submit`), or start local Ray;
    returns True when it started local Ray. A job that uses GPUs (`gpus`: this command's
    work needs them) is refused when local Ray would have none: its workers would wait for
    GPUs forever.

    Locally Ray gets two logical CPUs more than the training workers of `parallel_runs`
    runs hold, so the data pipeline always has room to run next to them (else a shuffle can
    wait forever).

    Local Ray gets its dashboard on a free port, named in RAY_API_SERVER_ADDRESS for the
    cluster's processes: Ray Train asks the state API (the dashboard's) whether a run's
    controller lives, every second. Without a dashboard each ask failed with a warning (a line a
    second in the run's log); without the address it asks the Ray started last on the machine,
    which need not be this one (another run, a test session): its monitor then dies on "multiple
    active Ray instances", and in a sweep Ray Train never learns that the controller of a trial
    ASHA stopped is gone, never frees its workers' CPUs, and the next trial waits for them
    forever (measured: a sweep hung at its third trial). The dashboard costs about 2 s of start.
    """
    import ray

    if os.environ.get("RAY_ADDRESS"):
        if not ray.is_initialized():
            ray.init(log_to_driver=True)
        return False
    if gpus and config.distributed.use_gpu:
        import torch

        if not (ray.cluster_resources().get("GPU", 0) if ray.is_initialized() else torch.cuda.device_count()):
            raise InputError("distributed.use_gpu is true, but there is no GPU here (no CUDA GPU, no RAY_ADDRESS "
                             "naming a cluster): set distributed.use_gpu to false to run on the CPU, or RAY_ADDRESS")
    if ray.is_initialized():
        return False
    needed = math.ceil(parallel_runs * config.distributed.max_workers * config.distributed.cpus_per_worker) + 2
    ray.init(address="local", num_cpus=max(os.cpu_count() or 1, needed), include_dashboard=True,
             log_to_driver=True, **dashboard_options(free_port()))
    return True


def dashboard_options(port: int) -> dict[str, Any]:
    """`ray.init` options of a local dashboard on `port` that this cluster's own processes
    (and no child process of the driver) use for Ray's state API."""
    return {"dashboard_port": port,
            "runtime_env": {"env_vars": {"RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{port}"}}}


def process_group_backend(config: JobConfig) -> str | None:
    """The workers' torch.distributed backend: Ray's (nccl on GPUs, gloo on CPUs), and for
    FSDP's CPU offload on GPUs gloo beside nccl, for the collectives over its shards in CPU
    memory (the gradient norm, the gathered weights saved): NCCL has no CPU tensors."""
    if config.distributed.use_gpu and config.distributed.strategy == "fsdp" and config.distributed.fsdp.offload == "cpu":
        return "cpu:gloo,cuda:nccl"
    return None


def free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def plan_steps(config: JobConfig, train_sequences: int) -> StepPlan:
    """Optimizer steps of the run from the packed dataset size.

    Raises:
        DataError: fewer packed sequences than workers.
    """
    workers = config.distributed.max_workers  # elastic: planned for the most workers (fewer see less data)
    per_worker = train_sequences // workers  # Ray splits datasets equally across workers
    if per_worker == 0:
        raise DataError(f"only {train_sequences} packed training sequences for {workers} workers: "
                        "add data or lower distributed.num_workers")
    batches_per_epoch = math.ceil(per_worker / config.train.micro_batch_size)
    # grpo.num_iterations: each step's batches train that many steps in a row
    steps = config.train.max_steps or max(1, int(config.train.epochs * batches_per_epoch
                                                 // config.train.gradient_accumulation)) * config.rounds
    return StepPlan(total_steps=steps, batches_per_epoch=batches_per_epoch)


def base_model_path(config: JobConfig, run: RunFolder) -> str:
    """Where adapters say their base model is: a built-in model is written to the run folder
    (or a local cache for object-store runs), so PEFT can load it without ft-ray."""
    from ft_ray.models import is_builtin, save_base_model

    if not is_builtin(config.model.name_or_path):
        return config.model.name_or_path
    name = config.model.name_or_path.split(":", 1)[1]
    folder = run.local_path("base_model") if run.is_local else Path.home() / ".cache" / "ft-ray" / name
    return str(save_base_model(config.model, folder))


def run_training(config: JobConfig, force_new: bool = False, callbacks: list | None = None) -> dict[str, Any]:
    """Fine-tune as the job says; returns the summary also written to `summary.json`.

    A run folder of the same name with checkpoints is resumed, if the job is the same one
    (`check_same_job`); `force_new` moves such a folder aside and starts over. The driver
    holds a local run folder while it trains it (`holding`). `callbacks` go to Ray Train's
    RunConfig (a sweep passes Tune's report callback).
    """
    from ft_ray.models import adapter_line, load_tokenizer, model_warnings

    started = time.monotonic()
    # said before Ray starts: a model or data files that are not there (data_files lists the
    # files), a relaunch that cannot resume
    tokenizer = load_tokenizer(config.model)
    if config.objective == "grpo":
        from ft_ray.evaluation.metrics import check_rewards

        check_rewards(config.grpo.rewards, config.storage)  # a reward function or model that is not there
    if config.objective == "distill":
        from ft_ray.train.distillation import check_teacher

        LOG.info(check_teacher(config, tokenizer))  # a teacher that is not there, or speaks other tokens
    if config.model.adapter:
        LOG.info(adapter_line(config))
    for warning in model_warnings(config):
        if not warning.startswith("note: "):  # the workers say what they mend
            LOG.warning(warning)
    if not os.environ.get("RAY_ADDRESS"):  # on a cluster, rank 0 logs to W&B from a node of the cluster
        check_wandb_login(config)
    files = None if config.data.prepared else data_files(config)  # listed once: the fingerprint and the resume check
    prepared = location(config, files)
    run = RunFolder.for_job(config)
    resume_from = check_same_job(config, run, force_new)
    with holding(run, trial=bool(callbacks)):
        same_data = files is None or check_same_data(run, files, resume_from is not None)
        # a sweep's trial reports to Tune through Ray Train: it always runs
        if same_data and not callbacks and (done := finished_run(config, run, resume_from)):
            LOG.info(f"train: {run.uri} has trained all its {done['steps']} steps already (summary.json): nothing to "
                     "do. Raise train.max_steps or train.epochs to train on, or start over with --force-new")
            return done
        return _train(config, run, tokenizer, prepared, callbacks, started)


def _train(config: JobConfig, run: RunFolder, tokenizer: Any, prepared: str, callbacks: list | None,
           started: float) -> dict[str, Any]:
    """`run_training` once the job is checked: Ray, the data, Ray Train's run, the summary."""
    import ray.data
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    connect_ray(config)
    check_placement(config)
    run.write_text("config.yaml", dump_yaml(config))
    base_path = base_model_path(config, run)
    datasets, stats = datasets_for(config, tokenizer, run.path("rejected"), run.fs, prepared)
    if config.precomputes:
        datasets = with_precomputed(config, datasets)
    plan = plan_steps(config, stats.train_sequences)
    # Preparation showed its progress; bars for every eval pass during training are noise.
    ray.data.DataContext.get_current().enable_progress_bars = False
    fs, storage_path = filesystem(config.storage)
    LOG.info(f"data:\n{stats_table(stats)}")
    LOG.info(f"train: {plan.total_steps} steps on {_workers(config)} worker(s), {config.method}, "
             f"{_strategy(config)}, {config.train.micro_batch_size * config.train.gradient_accumulation} "
             f"sequences of {config.model.max_seq_len} tokens per worker per step")

    set_aside_stale_snapshot(run)
    with progress.watching("train", plan.total_steps, "steps", _train_figures) as board, sigint_kept():
        trainer = TorchTrainer(
            train_loop_per_worker,
            train_loop_config={"job": config.model_dump(mode="json"), "plan": asdict(plan),
                               "base_model_path": base_path, "progress": board,
                               "eval_sets": scored_sets(config, datasets)},
            scaling_config=ray.train.ScalingConfig(
                num_workers=tuple(config.distributed.num_workers) if config.distributed.elastic
                else config.distributed.num_workers, use_gpu=config.distributed.use_gpu,
                resources_per_worker={"CPU": config.distributed.cpus_per_worker,
                                      **({"GPU": config.distributed.gpu_share} if config.distributed.use_gpu else {})},
                placement_strategy=config.distributed.placement_strategy),
            run_config=ray.train.RunConfig(
                name=config.run_name, storage_path=storage_path, storage_filesystem=fs,
                checkpoint_config=ray.train.CheckpointConfig(
                    num_to_keep=config.train.keep_checkpoints, checkpoint_score_attribute="eval_loss",
                    checkpoint_score_order="min"),
                failure_config=ray.train.FailureConfig(max_failures=config.distributed.max_failures),
                callbacks=callbacks),
            torch_config=TorchConfig(backend=process_group_backend(config), timeout_s=config.distributed.timeout_s),
            datasets=worker_datasets(config, datasets),
            dataset_config=ingest_config(),
        )
        trainer.fit()
    summary = summarize(config, run, stats, plan, time.monotonic() - started)
    run.write_json("summary.json", summary)
    return summary


@contextlib.contextmanager
def sigint_kept() -> Iterator[None]:
    """Put back the SIGINT handler Ray Train's `fit()` replaces: its handler aborts that run's
    controller and holds the controller's handle, so in a process that goes on (a notebook, a
    sweep's driver, the steps after training) Ctrl-C after the run would be swallowed by a run
    that is over, and its controller actor would stay alive until the next run."""
    previous = signal.getsignal(signal.SIGINT)
    try:
        yield
    finally:
        if previous is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, previous)


def _strategy(config: JobConfig) -> str:
    dist = config.distributed
    if dist.strategy == "deepspeed":
        loads = " (rank 0 reads the weights)" if config.partitions_at_load else ""
        return f"DeepSpeed ZeRO-{dist.deepspeed.stage}{loads}"
    if dist.strategy == "fsdp":
        return "FSDP2 (rank 0 reads the weights)" if config.loads_on_rank0 else "FSDP2"
    return "DDP"


def _train_figures(counts: dict[str, int], latest: dict[str, dict]) -> tuple[int, str]:
    """Step done, and the latest epoch, loss, eval loss (with its step) and tokens/s."""
    record, evaluated, copy = latest.get("train", {}), latest.get("eval", {}), latest.get(MODEL_COPY, {})
    if not record and not evaluated and copy:  # a worker copying an s3:// model to its node
        mib, copied = copy["bytes"] / 2**20, copy["copied"] / 2**20
        rate = f"{copied / max(copy['seconds'], 1e-3):,.0f} MiB/s"
        if copied < mib:
            return 0, f"copying {copy['uri']} to a node's model cache: {copied:,.1f} of {mib:,.1f} MiB ({rate})"
        return 0, f"copied {copy['uri']} to a node's model cache ({mib:,.1f} MiB, {rate}); loading it"
    shown = [f"epoch {record['epoch']:.2f}"] if "epoch" in record else []
    shown += [f"loss {record['loss']:.3g}"] if "loss" in record else []
    if "eval_reward" in evaluated:  # grpo
        shown.append(f"eval reward {evaluated['eval_reward']:.3g} (step {evaluated['step']})")
    elif "eval_loss" in evaluated:
        shown.append(f"eval loss {evaluated['eval_loss']:.3g} (step {evaluated['step']})")
    if "tokens_per_s" in record:
        shown.append(f"{record['tokens_per_s']:.0f} tokens/s")
    return int(record.get("step", 0)), "  ".join(shown)


def check_same_job(config: JobConfig, run: RunFolder, force_new: bool) -> str | None:
    """A relaunch resumes only the job it started as; returns the name of the complete
    checkpoint it resumes from (None: it starts from step 0).

    Raises:
        InputError: the run folder holds checkpoints of a job with other settings (those a
            resume may change aside, see `config.RESUMABLE_KEYS`), or only incomplete ones.
    """
    try:
        candidates = list_checkpoints(run.fs, run.root)
    except OSError as e:
        raise StorageError(f"cannot list {run.uri}: {e}") from e
    if not candidates:
        return None
    if force_new:
        with holding(run):  # not from under a driver that trains it
            moved = run.move_aside(leave=(DRIVER_LOCK,))
        LOG.info(f"--force-new: moved the old run folder to {moved}")
        return None
    old = yaml.safe_load(run.read_text("config.yaml") or "{}") or {}
    changes = resume_changes(old, config.model_dump(mode="json"))
    if changes:
        raise InputError(
            f"{run.uri} holds checkpoints of a run with other settings: " + "; ".join(changes[:8])
            + ". Revert them to resume it, choose another run_name, or start this one over with --force-new "
            "(the old folder is moved aside, not deleted).")
    complete, skipped = complete_checkpoints(run.fs, run.root)
    if not complete:
        raise no_complete_checkpoint(run.uri, skipped)
    # Said here, not by the workers after the model is built (minutes for a large model).
    dist = config.distributed
    zero_stage = dist.deepspeed.stage if dist.strategy == "deepspeed" else 0
    saved_by = json.loads(run.read_text(f"{complete[0].name}/{MANIFEST}") or "{}").get("world_size", dist.max_workers)
    problem = zero_shards_problem(zero_stage, saved_by, dist.max_workers, run.uri_of(complete[0].name))
    if problem:
        raise InputError(problem)
    for name, why in skipped:
        LOG.warning(f"checkpoint {run.uri_of(name)} is incomplete ({why}); "
                    f"resuming from {run.uri_of(complete[0].name)}")
    return complete[0].name


def finished_run(config: JobConfig, run: RunFolder, resume_from: str | None) -> dict[str, Any] | None:
    """The summary of a run that did all the job asks (the same length: `train.max_steps`
    and `epochs`, the rest checked by `check_same_job`; every planned step, or stopped by
    `train.early_stopping_patience`; its last checkpoint the one it would resume from): a
    relaunch has nothing to train, and would spend the cluster's start-up, the data and the
    model load on it."""
    summary = json.loads(run.read_text("summary.json") or "null") if resume_from else None
    if not summary:
        return None
    trained = with_defaults(yaml.safe_load(run.read_text("config.yaml") or "null") or {}).get("train", {})
    lengths = ("max_steps", "epochs", "early_stopping_patience", "early_stopping_min_delta")
    finished = (all(trained.get(key) == getattr(config.train, key) for key in lengths)
                and (summary.get("steps") == summary.get("planned_steps") or summary.get("early_stopping"))
                and str(summary.get("latest_checkpoint")).rsplit("/", 1)[-1] == resume_from)
    return summary if finished else None


DRIVER_LOCK = ".driver.lock"  # held by the driver training the run (its flock, or its lease in object storage)


LOCK_TRIES, LOCK_RETRY_S = 5, 0.05


@contextlib.contextmanager
def holding(run: RunFolder, trial: bool = False) -> Iterator[None]:
    """This driver's hold on a run folder. A second driver of the same run is refused, not
    left to write the same checkpoints and metrics beside the first; a killed driver's
    relaunch is not. A local folder: an flock, released by the OS however the process ends.
    An object store: a lease object the driver renews (`ft_ray.lease`; a relaunch takes over
    a dead driver's within `lease.LEASE_TTL_S`), except for a sweep's `trial` (the sweep's
    driver holds the sweep's; Tune may kill a trial's process at any moment).

    Raises:
        InputError: another process holds the run, named as it wrote itself in the lock file.
    """
    if not run.is_local and trial:
        yield
        return
    if not run.is_local:
        from ft_ray.lease import held, object_lease

        with held(object_lease(run.root, DRIVER_LOCK, run.uri, run.storage or StorageConfig())):
            yield
        return
    import fcntl
    import socket

    path = run.local_path(DRIVER_LOCK)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+", encoding="utf-8") as lock:
        for attempt in range(LOCK_TRIES):  # `ft-ray runs` probes the lock for an instant: not a driver
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if attempt + 1 < LOCK_TRIES:
                    time.sleep(LOCK_RETRY_S)
                    continue
                lock.seek(0)
                raise InputError(f"{run.uri} is being trained by another driver ({lock.read().strip() or 'unnamed'}): "
                                 "wait for it to end, or choose another run_name") from None
            except OSError:  # a filesystem without locks (some network and FUSE mounts): held by no one
                yield
                return
        lock.seek(0)
        lock.truncate()
        lock.write(f"pid {os.getpid()} on {socket.gethostname()} since "
                   f"{time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime())} UTC\n")
        lock.flush()
        yield


DATA_FILES = "data_files.json"  # the data files (path: size, time) the run last started or resumed on


def check_same_data(run: RunFolder, files: list[dict[str, Any]], resumes: bool) -> bool:
    """Warns when a resumed run's data files changed since it last ran (it goes on from its
    step over the new data, whose sequences and order differ from those it began with), and
    records the files for the next relaunch; False when they changed."""
    now = {path: [size, mtime] for source in files for path, size, mtime in source["files"]}
    before = json.loads(run.read_text(DATA_FILES) or "null") if resumes else None
    if before is not None and before != now:
        changed = sorted(p for p in now.keys() & before.keys() if now[p] != before[p])
        counts = [f"{len(names)} {what}" for names, what in ((changed, "changed"), (now.keys() - before.keys(), "added"),
                                                            (before.keys() - now.keys(), "removed")) if names]
        example = (f" ({changed[0]}: {before[changed[0]][0]} -> {now[changed[0]][0]} bytes, modified "
                   f"{now[changed[0]][1]})" if changed else "")
        LOG.warning(f"the data files changed since {run.uri} last ran: {', '.join(counts)}{example}. It resumes "
                    "at its step over the new data, whose sequences and order differ from those it began with; "
                    "--force-new starts over on them")
    run.write_json(DATA_FILES, now)
    return before is None or before == now


def worker_datasets(config: JobConfig, datasets: dict[str, Any]) -> dict[str, Any]:
    """The training set cut here into one fixed, equal piece per possible worker, so each
    rank's samples are the same in every run, and the whole eval set for every worker
    (`loop.evaluate` shares it out)."""
    pieces = datasets["train"].split(config.distributed.max_workers, equal=True)
    held_out = {split: dataset for split, dataset in datasets.items() if split != "train"}  # eval and the eval sets
    return {**held_out, **{TRAIN_PIECE.format(i): piece for i, piece in enumerate(pieces)}}


def scored_sets(config: JobConfig, datasets: dict[str, Any]) -> list[str]:
    """The names of the job's `data.eval_sets` its data has (a warning for each it lacks:
    prepared data named by data.prepared that was made without it)."""
    names = [name for name in config.data.eval_sets if EVAL_SET.format(name) in datasets]
    for name in config.data.eval_sets.keys() - set(names):
        LOG.warning(f"data.eval_sets.{name} is not in the prepared data at {config.data.prepared} (prepared "
                    "without it): it is not scored; prepare the data again to score it")
    return names


def ingest_config() -> Any:
    """How Ray Train hands the pieces (`worker_datasets`, split here) to the workers: whole,
    each read in its order.

    Ray Train builds each worker's read options in its controller, a process whose Ray Data
    context keeps the default `preserve_order=False`; the threads that format batches
    (`train.prefetch_batches` >= 2) then hand over batches as they finish, and under load
    two consecutive steps swapped their samples (CI: a resumed DPO run, steps 8 and 9).
    """
    import ray.train

    options = ray.train.DataConfig.default_ingest_options()
    options.preserve_order = True
    return ray.train.DataConfig(datasets_to_split=[], execution_options=options)


def _workers(config: JobConfig) -> str:
    low_high = config.distributed.num_workers
    return f"{low_high[0]}-{low_high[1]}" if config.distributed.elastic else str(low_high)


def summarize(config: JobConfig, run: RunFolder, stats: DataStats, plan: StepPlan,
              wall_s: float) -> dict[str, Any]:
    """The run's outcome from `metrics.jsonl` and the complete checkpoints in storage;
    exports the best weights. (Ray's result is not used: it can miss a checkpoint a
    restarted run resumed from.)"""
    metrics = read_metrics(run)
    train_lines = [m for m in metrics if "loss" in m]
    evals = [m for m in metrics if "eval_loss" in m]
    complete = complete_checkpoints(run.fs, run.root)[0]
    chosen = best_of(complete, {m["step"]: m["eval_loss"] for m in evals})
    best = run.path(chosen.name) if chosen else None
    exported = export_best(config, run, best) if best else None
    speeds = [m["tokens_per_s"] for m in train_lines[1:]] or [m["tokens_per_s"] for m in train_lines]
    initial, final = first_and_last(evals, "eval_loss")
    steps = train_lines[-1]["step"] if train_lines else 0
    # an early stop the run ended with (not one a relaunch with more patience trained past)
    stopped = [m for m in evals if "early_stopping" in m and m["step"] == steps]
    return {
        "run_name": config.run_name,
        "run_folder": run.uri,
        "method": config.method,
        "steps": steps,
        "planned_steps": plan.total_steps,
        "epochs": train_lines[-1].get("epoch") if train_lines else None,  # read by then (None: logged before 2026-12-06)
        "early_stopping": {"step": stopped[-1]["step"], **stopped[-1]["early_stopping"]} if stopped else None,
        "train_tokens": train_lines[-1]["train_tokens"] if train_lines else 0,
        "train_loss_final": train_lines[-1]["loss"] if train_lines else None,
        "eval_loss_initial": initial,
        "eval_loss_final": final,
        "eval_loss_reduction": (1 - final / initial) if initial and final is not None else None,
        **preference_outcome(config, evals),
        "eval_sets": eval_set_outcome(config, evals),
        "tokens_per_second": statistics.median(speeds) if speeds else None,
        "best_checkpoint": run.uri_of(Path(best).name) if best else None,
        "latest_checkpoint": run.uri_of(complete[0].name) if complete else None,
        "adapter_path": exported if config.trains_adapter else None,
        "model_path": None if config.trains_adapter else exported,
        "data": asdict(stats),
        "wall_time_s": round(wall_s, 1),
    }


def eval_set_outcome(config: JobConfig, evals: list[dict]) -> dict[str, dict[str, float]]:
    """Each of `data.eval_sets`' loss before and after training (what the run cost or gained
    on it), by name."""
    outcome = {}
    for name in config.data.eval_sets:
        initial, final = first_and_last(evals, eval_set_metric(name))
        if initial is not None:
            outcome[name] = {"loss_initial": initial, "loss_final": final,
                             "loss_change": final / initial - 1 if initial else None}
    return outcome


def preference_outcome(config: JobConfig, evals: list[dict]) -> dict[str, Any]:
    """A preference run's objective and held-out reward accuracy (grpo: the held-out greedy
    answers' mean reward; distill: the held-out divergence from the teacher and next-token loss)
    before and after training."""
    if config.objective == "sft":
        return {}
    keys = {"grpo": ["eval_reward"], "distill": ["eval_divergence", "eval_next_token_loss"]}.get(
        config.objective, ["eval_reward_accuracy"])
    outcome = {"objective": config.objective}
    for key in keys:
        outcome[f"{key}_initial"], outcome[f"{key}_final"] = first_and_last(evals, key)
    return outcome


def first_and_last(evals: list[dict], key: str) -> tuple[Any, Any]:
    """The first and the last evaluation's value of `key` (None, None where none has it)."""
    values = [m[key] for m in evals if key in m]
    return (values[0], values[-1]) if values else (None, None)


def export_best(config: JobConfig, run: RunFolder, checkpoint_path: str) -> str:
    """The adapter (LoRA) or model (full) of a checkpoint written to `<run>/adapter|model`;
    returns where (a local path, or a URI for object stores)."""
    import ray.train

    from ft_ray.export import export_checkpoint

    weights_dir = "adapter" if config.trains_adapter else "model"
    if run.is_local:
        return str(export_checkpoint(Path(checkpoint_path), run.local_path(weights_dir), config=config))
    with ray.train.Checkpoint(checkpoint_path, run.fs).as_directory() as folder, \
            tempfile.TemporaryDirectory() as out:
        export_checkpoint(Path(folder), Path(out), config=config)
        return run.upload(Path(out), weights_dir)
