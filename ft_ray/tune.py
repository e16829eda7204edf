"""Sweeps: a Ray Tune search over job keys, each trial a full Ray Train run, ASHA to stop
the trials that fall behind, and the best trials exported to `<storage>/<sweep>/winners/`.

Layout of a sweep folder (`<storage.path>/<tune.name>/`):
    prepared/            the data, tokenized and packed once for every trial
    trials/<trial run>/  each trial's run folder (checkpoints, metrics.jsonl, summary.json)
    tune/                Tune's experiment state (`ft-ray tune CONFIG --resume` restores it)
    winners/<rank>-<trial run>/  the exported variant, `winner.json` written last
    sweep.json           every trial: settings, final metrics, status, stopped early or not
"""

from __future__ import annotations

import math
import os
import threading
from typing import Any, Callable

from pydantic import ValidationError
from ray.train.v2.api.callback import UserCallback
from ray.tune import Callback

from ft_ray.config import (ConfigError, InputError, JobConfig, TuneConfig, dump_yaml, edge_values, sweep_name,
                           with_overrides)
from ft_ray.console import LOG, TERMINAL, quiet
from ft_ray.models import ADAPTER_SETTINGS
from ft_ray.storage import RunFolder
from ft_ray.tracking import TrialRuns, check_wandb_login

DISTRIBUTIONS = ("choice", "grid", "uniform", "loguniform", "randint")


# ---------------------------------------------------------------- the search space


def check_search_space(config: JobConfig) -> None:
    """Every key names a setting of the job and every value it can take is valid for it.

    Raises:
        ConfigError: one line per problem, naming `tune.search_space.<key>`, before any trial runs.
    """
    tune = config.tune or TuneConfig()
    problems = []
    if not tune.search_space:
        problems.append("tune.search_space: empty; name at least one key to search, e.g. "
                        "train.learning_rate: {loguniform: [1.0e-5, 1.0e-3]}")
    base = config.model_dump(mode="json")
    prepared = _prepared_key(config, config)
    for key, spec in tune.search_space.items():
        where = f"tune.search_space.{key}"
        problem = _spec_problem(spec, tune.search_alg)
        from_adapter = [f"lora.{setting}" for setting in (*ADAPTER_SETTINGS, "init")] if config.model.adapter else []
        if key == "model.adapter" or key in from_adapter:
            problem = ("set by the adapter the sweep trains on from (model.adapter): its adapter_config.json; "
                       "search the training settings (learning rate, dropout, steps...)")
        if problem:
            problems.append(f"{where}: {problem}")
            continue
        for value in edge_values(spec):
            trial, problem = _trial(base, key, value)
            if trial is not None and _prepared_key(config, trial) != prepared:
                problem = (f"value {value!r} changes the data the sweep prepares once for all its trials (tokenized "
                           "and packed, with any precomputed reference or teacher logits): set it in the job, a sweep "
                           "per value")
            if problem:
                problems.append(f"{where}: {problem}")
                break
    if problems:
        raise ConfigError(problems)


def _prepared_key(config: JobConfig, job: JobConfig) -> str:
    """The fingerprint of the data `job` (the sweep's job or one trial's) would prepare, from its
    sources as set, not their files (no request), with the sweep's shuffle seed: every trial
    reads the sweep's order, so a searched seed changes nothing prepared. A trial whose key is not
    the sweep's would train on data prepared for other settings (the tokenized, packed sequences
    and any precomputed reference or teacher logits)."""
    from ft_ray.data.prepared import data_sources, fingerprint

    pinned = job.model_copy(update={"data": job.data.model_copy(update={"shuffle_seed": config.shuffle_seed})})
    return fingerprint(pinned, [{"source": source.model_dump()} for _, source in data_sources(job)], listed=False)


def _spec_problem(spec: dict, search_alg: str) -> str | None:
    kinds = [k for k in spec if k in DISTRIBUTIONS]
    if len(spec) != 1 or len(kinds) != 1:
        return f"give exactly one of {', '.join(DISTRIBUTIONS)}, got {sorted(spec)}"
    kind, values = kinds[0], spec[kinds[0]]
    if not isinstance(values, list) or not values:
        return f"{kind}: a non-empty list of values"
    if kind in ("uniform", "loguniform", "randint"):
        if len(values) != 2 or not all(isinstance(v, (int, float)) for v in values) or values[0] >= values[1]:
            return f"{kind}: [low, high] with low < high, got {values}"
        if kind == "loguniform" and values[0] <= 0:
            return f"loguniform: low must be > 0, got {values[0]}"
        if search_alg == "grid":
            return f"{kind} cannot be searched with search_alg grid; use grid or choice lists"
    if kind == "grid" and search_alg == "optuna":
        return "grid cannot be used with search_alg optuna; use choice"
    return None


def _trial(base: dict, key: str, value: Any) -> tuple[JobConfig | None, str | None]:
    """The job of a trial with `key` set to `value`, or the problem that value has."""
    try:
        return JobConfig.model_validate(with_overrides(base, {key: value})), None
    except KeyError:
        return None, "not a key of the job schema (see ft_ray/config.py)"
    except ValidationError as e:
        first = e.errors()[0]
        loc = ".".join(str(p) for p in first["loc"])
        if first["type"] == "extra_forbidden" and loc == key:
            return None, "not a key of the job schema (see ft_ray/config.py)"
        return None, f"value {value!r}: {loc}: {first['msg']}"


def param_space(tune: TuneConfig) -> dict[str, Any]:
    """The Tune search space of the dotted keys."""
    from ray import tune as ray_tune

    space = {}
    for key, spec in tune.search_space.items():
        kind, values = next(iter(spec.items()))
        if kind == "grid" or (kind == "choice" and tune.search_alg == "grid"):
            space[key] = ray_tune.grid_search(values)
        elif kind == "choice":
            space[key] = ray_tune.choice(values)
        elif kind == "uniform":
            space[key] = ray_tune.uniform(*values)
        elif kind == "loguniform":
            space[key] = ray_tune.loguniform(*values)
        else:
            space[key] = ray_tune.randint(*values)
    return space


# ---------------------------------------------------------------- one trial


def trial_job(base: dict, overrides: dict[str, Any], sweep: str, trial_id: str, prepared: str,
              for_workers: bool = True) -> JobConfig:
    """The job one trial runs: the sweep's job with the trial's values, its own run folder
    under `<sweep>/trials/`, the sweep's prepared data. W&B is the driver's (`TrialRuns`):
    `for_workers` turns it off in the job the workers get."""
    job = with_overrides(base, overrides)
    job["run_name"] = f"{sweep}-{trial_id}"
    job["storage"]["path"] = f"{job['storage']['path'].rstrip('/')}/{sweep}/trials"
    job["data"]["prepared"] = prepared
    job["tracking"]["wandb"]["group"] = sweep
    if for_workers:
        job["tracking"]["wandb"]["mode"] = "disabled"
    job["tune"] = None
    return JobConfig.model_validate(job)


class WandbTrials(Callback):
    """Tune callback in the sweep's driver: each trial's W&B run follows its metrics.jsonl
    on every report and is finished when the trial ends (finished, stopped or failed)."""

    def __init__(self, base: dict, sweep: str, prepared: str, directory: str | None):
        self.base, self.sweep, self.prepared = base, sweep, prepared
        self.directory = directory
        self.runs: TrialRuns | None = None

    def _update(self, trial: Any, final: bool) -> None:
        config = trial_job(self.base, trial.config, self.sweep, trial.trial_id, self.prepared, for_workers=False)
        if self.runs is None:
            self.runs = TrialRuns(config.tracking.wandb, self.directory)
        try:
            self.runs.update(config, RunFolder.for_job(config), final)
        except Exception as e:  # noqa: BLE001 - tracking must never stop a sweep
            LOG.warning(f"W&B logging of {config.run_name} failed: {e}")

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        self._update(trial, final=False)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._update(trial, final=True)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._update(trial, final=True)


class TrialLines(Callback):
    """The sweep on the terminal: a line when a trial starts (its values) and when it ends
    (stopped by the scheduler, or finished, with its last metric), and in a terminal a live
    table of the running trials. Tune's own status table goes to the log with the rest of
    Ray's output. `finished(trial)`: whether the trial's run wrote its summary (as sweep.json
    tells finished from stopped trials)."""

    def __init__(self, metric: str, max_steps: int, live: bool, finished: Callable[[Any], bool]):
        self.metric, self.max_steps, self.finished, self.wants_live = metric, max_steps, finished, live
        self.running: dict[str, tuple[str, dict]] = {}  # trial id -> (its values, last result)
        self.live: Any = None  # the table, made on first draw

    def __getstate__(self) -> dict:
        """Tune pickles the run config with its callbacks: without the live table (a terminal)."""
        return {**self.__dict__, "live": None}

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.running[trial.trial_id] = (trial_values(trial.config), {})
        LOG.info(f"trial {trial.trial_id} started: {trial_values(trial.config)}")
        self._draw()

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        if trial.trial_id in self.running:
            self.running[trial.trial_id] = (self.running[trial.trial_id][0], result)
            self._draw()

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        result = trial.last_result or {}
        step, value = result.get("step"), result.get(self.metric)
        shown = f"{self.metric} {value:.4g}" if isinstance(value, (int, float)) else f"no {self.metric}"
        how = f"finished at step {step}" if self.finished(trial) else f"stopped by the scheduler at step {step}"
        self._end(trial, f"trial {trial.trial_id} {how}: {shown}")

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._end(trial, f"trial {trial.trial_id} failed (its error is in the log and sweep.json)")

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        if self.live is not None:
            self.live.stop()
            self.live = None
            TERMINAL.rich = None

    def _end(self, trial: Any, line: str) -> None:
        self.running.pop(trial.trial_id, None)
        LOG.info(line)
        self._draw()

    def _draw(self) -> None:
        if not self.wants_live:
            return
        from rich.console import Console
        from rich.live import Live
        from rich.table import Table
        from rich.text import Text

        if self.live is None:
            self.live = Live(console=Console(file=TERMINAL.stream(), force_terminal=True, highlight=False),
                             auto_refresh=False, transient=True, redirect_stdout=False, redirect_stderr=False)
            self.live.start()
            TERMINAL.rich = self.live.console  # ft-ray's lines print above the table
        table = Table(title=Text("[ft-ray] running trials"), title_justify="left")
        for column in ("trial", "values", "step", self.metric):
            table.add_column(column)
        for trial_id, (values, result) in sorted(self.running.items()):
            value = result.get(self.metric)
            table.add_row(trial_id, values, f"{result.get('step', 0)}/{self.max_steps}",
                          f"{value:.4g}" if isinstance(value, (int, float)) else "")
        self.live.update(table, refresh=True)


def trial_values(overrides: dict[str, Any]) -> str:
    """`learning_rate=0.0012 rank=8`: a trial's searched values, by the last part of each key."""
    return " ".join(f"{key.rsplit('.', 1)[-1]}={value:.3g}" if isinstance(value, float)
                    else f"{key.rsplit('.', 1)[-1]}={value}" for key, value in sorted(overrides.items()))


def run_trial(overrides: dict[str, Any], base: dict, sweep: str, prepared: str) -> None:
    """Tune's trainable: one full Ray Train run whose eval reports reach Tune (and ASHA).
    Restored trials find their run folder and resume from its newest complete checkpoint."""
    import ray.data
    from ray import tune as ray_tune

    from ft_ray.train.trainer import run_training

    # the sweep prepared the data once, with its progress shown; each trial's read of it would
    # add bars of its own between the trials' lines
    ray.data.DataContext.get_current().enable_progress_bars = False
    config = trial_job(base, overrides, sweep, ray_tune.get_context().get_trial_id(), prepared)
    reports = TrainReports()
    report_to_tune(lambda: run_training(config, callbacks=[reports]), reports, ray_tune.report)


class TrainReports(UserCallback):
    """A trial's Ray Train reports (rank 0's metrics) on their way to Tune: the Train controller
    puts them in a queue, `report_to_tune` reports them from the trial's own thread.

    Not Ray's TuneReportCallback: it hands each report to the trial actor's main thread, and
    when the trial's function returns while the last report still waits in its one-slot queue,
    the function's own end result fills Tune's one-slot result queue first, so the main thread
    blocks putting that last report forever (Ray 2.60; a resumed trial hung so in CI)."""

    def __init__(self) -> None:
        from ray.util.queue import Queue

        self.queue = Queue(actor_options={"num_cpus": 0})

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
        self.queue.put(metrics[0])


def report_to_tune(train: Callable[[], Any], reports: TrainReports, report: Callable[[dict], None]) -> None:
    """Run `train` in a thread of its own and `report` what it reports, in order, from this one;
    returns once it has returned and every report is through, or raises what it raised."""
    from ray.util.queue import Empty

    ended: list[BaseException | None] = []

    def run() -> None:
        try:
            train()
            ended.append(None)
        except BaseException as e:  # noqa: BLE001 - raised again in the trial's thread
            ended.append(e)

    # a daemon: a trial the scheduler stops ends with its actor, its Train run with it
    threading.Thread(target=run, name="ft-ray trial", daemon=True).start()
    while True:
        over = bool(ended)  # read before the queue: a run over has put all it reports
        try:
            metrics = reports.queue.get(timeout=0.5)
        except Empty:
            if over:
                break
            continue
        report(metrics)
    if ended[0] is not None:
        raise ended[0]


# ---------------------------------------------------------------- the sweep


def sweep_folder(config: JobConfig) -> RunFolder:
    return RunFolder.for_job(config, sweep_name(config))


def concurrency(config: JobConfig, started_local: bool, resources: dict | None = None) -> int:
    """How many trials run at once: the config's number, or what the cluster (its total
    `resources`, default Ray's) holds."""
    import ray

    resources = resources or ray.cluster_resources()
    tune = config.tune or TuneConfig()
    if tune.max_concurrent_trials != "auto":
        return int(tune.max_concurrent_trials)
    dist = config.distributed
    if dist.use_gpu:  # a fraction of a GPU per worker: that many more trials
        fits = math.floor(resources.get("GPU", 0) / (dist.max_workers * dist.gpu_share) + 1e-9)
    else:
        cpus = (os.cpu_count() or 1) if started_local else resources.get("CPU", 0) - 2
        fits = cpus // (dist.max_workers * dist.cpus_per_worker + tune.trial_cpus)
    return int(max(1, min(fits, tune.num_samples * _grid_size(tune))))


def with_gpu_share(config: JobConfig, nodes: list[dict]) -> JobConfig:
    """The sweep's job with `distributed.gpus_per_worker: auto` settled for the cluster whose
    nodes have these total resources: one-worker trials get 1/k of a GPU when `ft-ray plan`
    puts k of the largest trial on the cluster's smallest GPU (several QLoRA trials per GPU);
    anything else gets whole GPUs."""
    from ft_ray.plan import cluster_gpus, gpu_share, model_shape, worst_case

    dist = config.distributed
    if not dist.use_gpu or dist.gpus_per_worker != "auto":
        return config
    share, why = 1.0, "trials of several workers take whole GPUs"
    if dist.max_workers == 1:
        memories = [m for _, m in cluster_gpus(nodes) if m]
        try:
            peak = worst_case(config, model_shape(config, network=False)[0])[1].peak_mib
            share, why = gpu_share(peak, min(memories)) if memories else (1.0, "no GPU of a type ft-ray knows")
        except InputError as e:
            why = str(e)
    LOG.info(f"distributed.gpus_per_worker auto: {share:g} ({why})")
    return config.model_copy(update={"distributed": dist.model_copy(update={"gpus_per_worker": share})})


def _grid_size(tune: TuneConfig) -> int:
    size = 1
    for spec in tune.search_space.values():
        kind, values = next(iter(spec.items()))
        if kind == "grid" or (kind == "choice" and tune.search_alg == "grid"):
            size *= len(values)
    return size


def run_sweep(config: JobConfig, resume: bool = False) -> dict[str, Any]:
    """Run (or with `resume`, finish) the sweep; returns what `sweep.json` holds."""
    from ft_ray.train.trainer import holding

    check_search_space(config)
    check_wandb_login(config)  # the sweep's driver logs every trial to W&B itself
    sweep = sweep_folder(config)
    with holding(sweep):  # a second driver of the same sweep is refused
        return _sweep(config, sweep, resume)


def _sweep(config: JobConfig, sweep: RunFolder, resume: bool) -> dict[str, Any]:
    """`run_sweep` once it holds the sweep's folder: Ray, the prepared data, Tune, the winners."""
    import ray
    from ray import tune as ray_tune

    from ft_ray.data.prepared import prepare, prepared_stats
    from ft_ray.models import load_tokenizer
    from ft_ray.train.placement import check_placement
    from ft_ray.train.trainer import connect_ray, plan_steps

    tune = config.tune or TuneConfig()
    # local Ray's dashboard (its state API) lets Ray Train release the workers of trials ASHA
    # stops (their controllers die with them); without it, their CPUs stay reserved
    started_local = connect_ray(config, parallel_runs=_local_parallel(config))
    config = with_gpu_share(config, [node["Resources"] for node in ray.nodes() if node["Alive"]])
    check_placement(config)  # the job's own workers (a trial whose search changes them checks its own)
    workers_at_once = concurrency(config, started_local)
    resume = _resume_or_start(sweep, resume)
    sweep.write_text("config.yaml", dump_yaml(config))
    prepared_at = config.data.prepared or f"{sweep.uri}/prepared"
    with_prepared = config.model_copy(update={"data": config.data.model_copy(update={"prepared": prepared_at})})
    stats = prepared_stats(with_prepared) or prepare(with_prepared, load_tokenizer(config.model))[1]
    max_steps = plan_steps(config, stats.train_sequences).total_steps
    LOG.info(f"sweep {sweep.uri}: {tune.num_samples} sample(s) x {_grid_size(tune)} grid point(s), "
             f"{workers_at_once} at once, {max_steps} steps each at most")

    trainable = ray_tune.with_resources(
        ray_tune.with_parameters(run_trial, base=config.model_dump(mode="json"), sweep=sweep_name(config),
                                 prepared=prepared_at),
        {"cpu": tune.trial_cpus})
    if resume:
        tuner = ray_tune.Tuner.restore(sweep.path("tune"), trainable=trainable, resume_unfinished=True,
                                       resume_errored=True, storage_filesystem=sweep.fs)
    else:
        tuner = ray_tune.Tuner(
            trainable, param_space=param_space(tune),
            tune_config=ray_tune.TuneConfig(
                metric=tune.metric, mode=tune.mode, num_samples=tune.num_samples,
                max_concurrent_trials=workers_at_once, search_alg=_search_alg(tune, workers_at_once),
                scheduler=_scheduler(tune, max_steps)),
            run_config=ray_tune.RunConfig(name="tune", storage_path=sweep.root, storage_filesystem=sweep.fs,
                                          callbacks=_callbacks(config, sweep, prepared_at, max_steps)))
    results = tuner.fit()

    from ft_ray.winners import summarize_sweep

    summary = summarize_sweep(config, sweep, results)
    if config.eval.after_training and summary["winners"]:
        from ft_ray.evaluation.evaluate import evaluate_sweep

        summary = evaluate_sweep(config, sweep.uri)
    return summary


def _callbacks(config: JobConfig, sweep: RunFolder, prepared: str, max_steps: int) -> list:
    tune = config.tune or TuneConfig()
    base, name = config.model_dump(mode="json"), sweep_name(config)

    def finished(trial: Any) -> bool:
        job = trial_job(base, trial.config, name, trial.trial_id, prepared, for_workers=False)
        return RunFolder.for_job(job).read_text("summary.json") is not None

    callbacks: list = [TrialLines(tune.metric, max_steps, quiet() and TERMINAL.is_tty(), finished)]
    if config.tracking.wandb.mode != "disabled":
        directory = config.tracking.wandb.dir or (sweep.root if sweep.is_local else None)
        callbacks.append(WandbTrials(base, name, prepared, directory))
    return callbacks


def _resume_or_start(sweep: RunFolder, resume: bool) -> bool:
    """Whether to restore the sweep's Tune state: asked for (`--resume`), or found unfinished
    (a relaunch after the driver died, a RayJob retry), as `ft-ray train` resumes a run.

    Raises:
        InputError: `--resume` with nothing to resume, or the sweep already finished.
    """
    from ray import tune as ray_tune

    if sweep.read_text("sweep.json") is not None:
        raise InputError(f"{sweep.uri} holds a finished sweep (sweep.json); choose another tune.name")
    found = ray_tune.Tuner.can_restore(sweep.path("tune"), storage_filesystem=sweep.fs)
    if resume and not found:
        raise InputError(f"--resume: no sweep state at {sweep.uri_of('tune')} to resume")
    if found and not resume:
        LOG.info(f"resuming the unfinished sweep at {sweep.uri}")
    return found


def _local_parallel(config: JobConfig) -> int:
    tune = config.tune or TuneConfig()
    if tune.max_concurrent_trials == "auto":
        return 1
    return int(tune.max_concurrent_trials)


def _search_alg(tune: TuneConfig, at_once: int) -> Any:
    if tune.search_alg != "optuna":
        from ray.tune.search.basic_variant import BasicVariantGenerator

        # Tune's default (grid points, random samples), seeded; a generator passed in must hold
        # the concurrency limit itself (Tune ignores max_concurrent_trials for it)
        return BasicVariantGenerator(random_state=tune.seed, max_concurrent=at_once)
    try:
        from ray.tune.search.optuna import OptunaSearch
    except ImportError as e:  # pragma: no cover - optuna is a dependency
        raise ConfigError([f"tune.search_alg: optuna is not installed ({e}); pip install optuna"]) from None
    return OptunaSearch(seed=tune.seed)


def _scheduler(tune: TuneConfig, max_steps: int) -> Any:
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    if tune.scheduler.type == "fifo":
        return FIFOScheduler()
    # Steps, not reports: trials report at each eval (train.eval_every). A trial that reaches
    # max_t is left to finish by itself (stop_last_trials=False): stopping it there would kill
    # its run while it writes its summary and exports.
    return ASHAScheduler(time_attr="step", max_t=max(max_steps, tune.scheduler.grace_period_steps + 1),
                         grace_period=tune.scheduler.grace_period_steps,
                         reduction_factor=tune.scheduler.reduction_factor, stop_last_trials=False)
