"""After a sweep: what each trial reached, the best ones exported, `sweep.json` written.

A winner folder `<sweep>/winners/<rank>-<trial run>/` holds the adapter (or model), plus the
merged model under `merged/` with `export.merge`, and `winner.json` (job, metrics, source
checkpoint URI, size and sha256 of every file) written last: a reader that finds
`winner.json` finds a complete variant.
"""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path
from typing import Any

from ft_ray.config import JobConfig, TuneConfig, sweep_name
from ft_ray.console import LOG
from ft_ray.storage import RunFolder, read_metrics
from ft_ray.train.checkpoints import best_of, complete_checkpoints


def trial_records(config: JobConfig, sweep: RunFolder, results: Any) -> list[dict[str, Any]]:
    """One record per trial: its values, last reported metrics, status, stopped early or not."""
    kept = ("eval_loss", "train_tokens", (config.tune or TuneConfig()).metric)  # the ranking metric may be another
    records = []
    for result in results:
        metrics = result.metrics or {}
        trial_id = metrics.get("trial_id") or Path(result.path).name.split("_")[-2]
        run_name = f"{sweep_name(config)}-{trial_id}"
        run = sweep.child("trials", run_name)
        summary = json.loads(run.read_text("summary.json") or "null")
        status = "error" if result.error else "finished" if summary else "stopped"
        records.append({
            "trial": run_name,
            "run_folder": run.uri,
            "config": {k: v for k, v in (result.config or {}).items()},
            "step": metrics.get("step"),
            "planned_steps": summary["planned_steps"] if summary else None,
            "metrics": {k: metrics[k] for k in kept if k in metrics},
            "status": status,
            "stopped_early": status == "stopped",
            "error": str(result.error).splitlines()[0][:500] if result.error else None,
        })
    return records


def ranked(records: list[dict], tune: TuneConfig) -> list[dict]:
    """Trials with the metric, best first (ties by name, so the order is stable)."""
    scored = [r for r in records if isinstance(r["metrics"].get(tune.metric), (int, float))
              and math.isfinite(r["metrics"][tune.metric])]
    sign = 1 if tune.mode == "min" else -1
    return sorted(scored, key=lambda r: (sign * r["metrics"][tune.metric], r["trial"]))


def summarize_sweep(config: JobConfig, sweep: RunFolder, results: Any) -> dict[str, Any]:
    """Rank the trials, export the top `tune.export_top_k`, write `sweep.json` (and the
    W&B sweep summary); returns what `sweep.json` holds."""
    tune = config.tune or TuneConfig()
    records = trial_records(config, sweep, results)
    winners: list[dict] = []
    for record in ranked(records, tune):
        if len(winners) == tune.export_top_k:
            break
        trial = sweep.child("trials", record["trial"])
        complete = complete_checkpoints(sweep.fs, trial.root)[0]
        if not complete:  # stopped before its first checkpoint: nothing to export
            LOG.info(f"{record['trial']} has no complete checkpoint; not a winner")
            continue
        winners.append(export_winner(config, sweep, record, len(winners) + 1, best_checkpoint(trial, complete)))
    summary = {"sweep": sweep.uri, "metric": tune.metric, "mode": tune.mode, "trials": records,
               "winners": [{"rank": w["rank"], "trial": w["trial"], "uri": w["uri"], "metrics": w["metrics"]}
                           for w in winners]}
    sweep.write_json("sweep.json", summary)
    log_sweep_to_wandb(config, summary)
    return summary


def export_winner(config: JobConfig, sweep: RunFolder, record: dict, rank: int, checkpoint: str) -> dict[str, Any]:
    """Export a trial's checkpoint to `winners/<rank>-<trial>/`, winner.json last."""
    import ray.train

    from ft_ray.export import export_checkpoint, merge_adapter
    from ft_ray.models import rope_overrides, stored_base
    from ft_ray.train.checkpoints import file_digests

    trial = sweep.child("trials", record["trial"])
    job = JobConfig.model_validate(_yaml(trial.read_text("config.yaml")))
    name = f"winners/{rank}-{record['trial']}"
    with ray.train.Checkpoint(trial.path(checkpoint), sweep.fs).as_directory() as folder, \
            tempfile.TemporaryDirectory() as out:
        export_checkpoint(Path(folder), Path(out) / "weights", config=job)
        if config.export.merge and job.trains_adapter:
            merge_adapter(Path(out) / "weights", Path(out) / "merged", rope=rope_overrides(job.model),
                          base=stored_base(job.model))
        files = file_digests(Path(out))
        uri = sweep.upload(Path(out), name)
    winner = {"rank": rank, "trial": record["trial"], "uri": uri, "config": job.model_dump(mode="json"),
              "searched": record["config"], "metrics": record["metrics"], "step": record["step"],
              "source_checkpoint": trial.uri_of(checkpoint), "files": files}
    sweep.write_json(f"{name}/winner.json", winner)  # last: its presence means the folder is complete
    shown = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in record["metrics"].items())
    LOG.info(f"winner {rank}: {record['trial']} ({shown}) -> {uri}")
    return winner


def best_checkpoint(trial: RunFolder, complete: list) -> str:
    """The complete checkpoint with the lowest eval loss in the trial's metrics (else the newest)."""
    evals = {record["step"]: record["eval_loss"] for record in read_metrics(trial) if "eval_loss" in record}
    chosen = best_of(complete, evals)
    if chosen is None:
        raise RuntimeError(f"{trial.uri}: no complete checkpoint to export")
    return chosen.name


def _yaml(text: str | None) -> dict:
    import yaml

    return yaml.safe_load(text or "{}") or {}


def log_sweep_to_wandb(config: JobConfig, summary: dict) -> None:
    """One W&B run per sweep (job type `sweep`, in the sweep's group) with the trials table
    and the winners; the trials' own runs hold their per-step metrics."""
    settings = config.tracking.wandb
    if settings.mode == "disabled":
        return
    import wandb

    name = sweep_name(config)
    keys = sorted({k for t in summary["trials"] for k in t["config"]})
    table = wandb.Table(columns=["trial", "status", "step", summary["metric"], *keys])
    for t in summary["trials"]:
        table.add_data(t["trial"], t["status"], t["step"], t["metrics"].get(summary["metric"]),
                       *[t["config"].get(k) for k in keys])
    directory = settings.dir or (str(Path(summary["sweep"])) if "://" not in summary["sweep"] else None)
    run = wandb.init(project=settings.project, entity=settings.entity, name=f"{name}-summary",
                     id=f"{name}-summary", group=name, job_type="sweep", mode=settings.mode, dir=directory,
                     config={"tune": (config.tune or TuneConfig()).model_dump(mode="json")}, resume="allow",
                     reinit="create_new")
    run.log({"trials": table})
    best = summary["winners"][0] if summary["winners"] else None
    run.summary.update({"trials": len(summary["trials"]),
                        "stopped_early": sum(t["stopped_early"] for t in summary["trials"]),
                        "best_trial": best["trial"] if best else None,
                        f"best_{summary['metric']}": best["metrics"].get(summary["metric"]) if best else None})
    run.finish()
