"""Where metrics go: `metrics.jsonl` in the run folder, the console (or the driver's
progress display), and W&B.

Only rank 0 tracks. W&B is imported only when enabled; its API key comes from the
environment (WANDB_API_KEY) or wandb's own login file, never from the job file.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any

from ft_ray.config import InputError, JobConfig, eval_set_metric
from ft_ray.storage import MetricsLog, RunFolder, read_metrics


class Tracker:
    """Rank 0's metrics sink: one `log` call writes to every enabled destination."""

    def __init__(self, config: JobConfig, run: RunFolder, resume_step: int | None, enabled: bool,
                 total_steps: int, board: Any = None):
        self.enabled, self.total_steps, self.board = enabled, total_steps, board
        rewards = ("reward", "eval_reward") if config.objective == "grpo" else ()  # grpo: eval_loss is -eval_reward
        self.shown = ("epoch", "loss", "eval_loss", *[eval_set_metric(name) for name in config.data.eval_sets], *rewards,
                      "lr", "grad_norm", "tokens_per_s", "mfu")
        self.last_put = None
        self.metrics = MetricsLog(run, resume_step, enabled)
        self.started = time.monotonic()
        self.wandb_run = _start_wandb(config, run) if enabled else None

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.metrics.log(record)
        if self.wandb_run is not None:
            numbers = {k: v for k, v in record.items() if k != "step" and isinstance(v, (int, float))}
            if numbers:
                self.wandb_run.log(numbers, step=record["step"])
        if self.board is not None:  # the driver's progress display (progress.watching)
            self.last_put = self.board.put.remote("eval" if "eval_loss" in record else "train", record)
        # Ray Train tees print() to its logger and to stdout (each line twice); the raw
        # stream reaches the driver once (its terminal, or in a quiet session its log).
        print(self._progress_line(record), file=sys.__stdout__, flush=True)

    def flush(self) -> None:
        self.metrics.flush()

    def finish(self) -> None:
        if self.last_put is not None:  # delivered before the worker exits (calls in flight die with it)
            import ray

            try:
                ray.get(self.last_put, timeout=10)
            except Exception:  # noqa: BLE001 - a display that misses the last line is no reason to fail
                pass
        if self.enabled:
            self.metrics.flush()
            if self.wandb_run is not None:
                self.wandb_run.finish()

    def _progress_line(self, record: dict[str, Any]) -> str:
        if "resumed_from" in record:
            return f"[ft-ray] resumed from {record['resumed_from']} at step {record['step']}"
        shown = [f"step {record['step']}/{self.total_steps}"]
        for key in self.shown:
            if key in record:
                value = record[key]
                shown.append(f"{key} {value:.3g}" if isinstance(value, float) else f"{key} {value}")
        shown.append(f"elapsed {time.monotonic() - self.started:.0f}s")
        return "[ft-ray] " + "  ".join(shown)


def check_wandb_login(config: JobConfig) -> None:
    """Online W&B needs an API key where W&B logs: WANDB_API_KEY, or the login file `wandb
    login` writes (~/.netrc); without one the run would fail at its first step, after Ray
    started and the data was prepared.

    Raises:
        InputError: mode online and no key here.
    """
    import netrc
    from urllib.parse import urlparse

    if config.tracking.wandb.mode != "online" or os.environ.get("WANDB_API_KEY"):
        return
    host = urlparse(os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai").hostname
    try:
        if netrc.netrc().authenticators(host or ""):
            return
    except (OSError, netrc.NetrcParseError):
        pass
    raise InputError("tracking.wandb.mode is online but no W&B API key is set here: set WANDB_API_KEY (or run "
                     "`wandb login`), or set tracking.wandb.mode to offline (runs written to disk) or disabled")


def _start_wandb(config: JobConfig, run: RunFolder) -> Any:
    settings = config.tracking.wandb
    if settings.mode == "disabled":
        return None
    import wandb

    directory = settings.dir or (str(run.local_path()) if run.is_local else None)
    return wandb.init(project=settings.project, entity=settings.entity, name=config.run_name,
                      id=config.run_name, resume="allow", mode=settings.mode, dir=directory,
                      group=settings.group, job_type="trial" if settings.group else "train",
                      config=config.model_dump(mode="json"))


class TrialRuns:
    """W&B for a sweep, kept by the sweep's driver: one run per trial (group = the sweep,
    job type `trial`, the trial's whole job as config) fed from the trial's `metrics.jsonl`
    each time the trial reports, and finished when the trial ends, however it ends.

    The driver outlives every trial; a trial ASHA stops dies at once, W&B buffers with it,
    so its workers do not log to W&B themselves.
    """

    def __init__(self, settings: Any, directory: str | None):
        self.settings, self.directory = settings, directory
        self.runs: dict[str, Any] = {}  # trial run name -> its W&B run
        self.logged: dict[str, int] = {}  # trial run name -> metrics lines already logged

    def update(self, config: JobConfig, run: RunFolder, final: bool = False) -> None:
        """Log the trial's metrics lines past the last one logged; finish the run if `final`."""
        if self.settings.mode == "disabled":
            return
        import wandb

        name = config.run_name
        if name not in self.runs:
            self.runs[name] = wandb.init(
                project=self.settings.project, entity=self.settings.entity, name=name, id=name,
                group=self.settings.group, job_type="trial", mode=self.settings.mode, dir=self.directory,
                config=config.model_dump(mode="json"), resume="allow", reinit="create_new")
            self.logged[name] = 0
        wandb_run = self.runs[name]
        lines = read_metrics(run)
        for record in lines[self.logged[name]:]:
            numbers = {k: v for k, v in record.items() if k != "step" and isinstance(v, (int, float))}
            if numbers:
                wandb_run.log(numbers, step=record["step"])
        self.logged[name] = max(self.logged[name], len(lines))
        if final:
            wandb_run.finish()
            del self.runs[name]
