"""`ft-ray runs`: the runs and sweeps under a storage path (local or s3://), one line each:
what was trained, how far, how the eval loss moved, and where each stands (finished, stopped
early, running, or interrupted and what a relaunch resumes from).
"""

from __future__ import annotations

import json
import time
from typing import Any

import yaml

from ft_ray.config import InputError, StorageConfig
from ft_ray.storage import RunFolder, read_metrics
from ft_ray.train.checkpoints import complete_checkpoints


def list_runs(path: str, storage: StorageConfig) -> list[dict[str, Any]]:
    """One record per run or sweep folder directly under `path` (a folder with the
    `config.yaml` ft-ray writes), by name.

    Raises:
        InputError: nothing is at `path`.
    """
    import pyarrow.fs as pafs

    root = RunFolder.at(path, storage)
    try:
        entries = root.fs.get_file_info(pafs.FileSelector(root.root, recursive=False))
    except FileNotFoundError:
        raise InputError(f"{root.uri}: no such folder") from None
    except OSError as e:
        raise InputError(f"{root.uri}: cannot list it ({e})") from None
    records = []
    for entry in sorted(entries, key=lambda e: e.base_name):
        if entry.type != pafs.FileType.Directory:
            continue
        folder = root.child(entry.base_name)
        config = folder.read_text("config.yaml")
        if config is not None:
            job = yaml.safe_load(config) or {}
            records.append(sweep_record(folder, job) if job.get("tune") else run_record(folder, job))
    return records


def run_record(folder: RunFolder, job: dict) -> dict[str, Any]:
    """A run's line: from its summary when that is its last word (a finished run's metrics,
    maybe long, are not read), else from its metrics."""
    holder = _holder(folder)
    summary_time, metrics_time = (folder.fs.get_file_info(folder.path(name)).mtime
                                  for name in ("summary.json", "metrics.jsonl"))
    # a summary older than the metrics: a relaunch (more steps) trained on after it
    current = summary_time is not None and not holder and (metrics_time is None or metrics_time <= summary_time)
    summary = json.loads(folder.read_text("summary.json") or "null") if current else None
    if summary:
        step, planned = summary["steps"], summary["planned_steps"]
        losses = [summary["eval_loss_initial"], summary["eval_loss_final"]]
    else:
        metrics = read_metrics(folder)
        trained, evals = [m for m in metrics if "loss" in m], [m for m in metrics if "eval_loss" in m]
        step, planned = trained[-1]["step"] if trained else 0, None
        losses = [evals[0]["eval_loss"], evals[-1]["eval_loss"]] if evals else None
    record = {"name": folder.uri.rstrip("/").rsplit("/", 1)[-1], "kind": "run", "uri": folder.uri,
              "method": job.get("method"), "objective": job.get("objective", "sft"), "step": step,
              "planned_steps": planned, "eval_loss": losses,
              "updated": _time(metrics_time)}
    if summary:
        stop = summary.get("early_stopping")
        record["status"] = f"stopped early at step {stop['step']}" if stop else "finished"
        verdict = (json.loads(folder.read_text("eval.json") or "{}").get("verdict") or {}).get("outcome")
        if verdict:
            record["eval_verdict"] = verdict
    elif holder:
        record["status"] = f"running ({holder})"
    else:
        complete, _ = complete_checkpoints(folder.fs, folder.root)
        record["status"] = (f"interrupted at step {record['step']}: a relaunch resumes from {complete[0].name}"
                            if complete else f"interrupted at step {record['step']}, before its first checkpoint")
    return record


def sweep_record(folder: RunFolder, job: dict) -> dict[str, Any]:
    summary = json.loads(folder.read_text("sweep.json") or "null")
    trials = _subfolders(folder.child("trials"))
    record = {"name": folder.uri.rstrip("/").rsplit("/", 1)[-1], "kind": "sweep", "uri": folder.uri,
              "method": job.get("method"), "objective": job.get("objective", "sft"), "trials": len(trials),
              "updated": _time(folder.fs.get_file_info(folder.path("sweep.json")).mtime)}
    holder = _holder(folder)
    if holder:
        record["status"] = f"running ({holder})"
    elif summary:
        finished = sum(t["status"] == "finished" for t in summary["trials"])
        winners = summary.get("winners") or []
        best = (f"; best {summary['metric']} {winners[0]['metrics'].get(summary['metric']):.4g} ({winners[0]['trial']})"
                if winners and isinstance(winners[0]["metrics"].get(summary["metric"]), (int, float)) else "")
        record["status"] = f"finished: {finished} of {len(summary['trials'])} trials ran to the end{best}"
    else:
        record["status"] = "interrupted: `ft-ray tune JOB --resume` finishes it"
    return record


def _subfolders(folder: RunFolder) -> list[str]:
    import pyarrow.fs as pafs

    try:
        entries = folder.fs.get_file_info(pafs.FileSelector(folder.root, recursive=False, allow_not_found=True))
    except OSError:
        return []
    return [e.base_name for e in entries if e.type == pafs.FileType.Directory]


def _holder(folder: RunFolder) -> str | None:
    """Who trains a run or sweep now (its driver's flock or lease, `trainer.holding`), or None."""
    from ft_ray.train.trainer import DRIVER_LOCK

    if not folder.is_local:
        from ft_ray.lease import LEASE_TTL_S, object_lease

        try:
            found = object_lease(folder.root, DRIVER_LOCK, folder.uri, folder.storage or StorageConfig()).read()
        except Exception:  # noqa: BLE001 - only a note in the listing; the store's errors are said elsewhere
            return None
        return found[1] if found and found[2] < LEASE_TTL_S else None
    import fcntl

    path = folder.local_path(DRIVER_LOCK)
    if not path.exists():
        return None
    with open(path, encoding="utf-8") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return lock.read().strip() or "a driver"
        except OSError:  # no locks on this filesystem: nothing to tell
            return None
        fcntl.flock(lock, fcntl.LOCK_UN)
    return None


def _time(mtime: Any) -> str | None:
    return None if mtime is None else time.strftime("%Y-%m-%d %H:%M", time.gmtime(mtime.timestamp()))


def table(records: list[dict[str, Any]]) -> str:
    """The records as aligned text lines."""
    rows = [("run", "method", "steps", "eval loss", "updated (UTC)", "status")]
    for r in records:
        if r["kind"] == "sweep":
            steps = f"{r['trials']} trials"
            method = f"sweep, {r['method']}"
        else:
            steps = f"{r['step']}/{r['planned_steps']}" if r["planned_steps"] else str(r["step"])
            method = r["method"] + ("" if r["objective"] == "sft" else f" {r['objective']}")
        loss = ""
        if r.get("eval_loss") and r.get("objective") == "grpo":  # its eval loss is minus the held-out reward
            before, after = (-value or 0.0 for value in r["eval_loss"])  # no "-0"
            loss = f"reward {before:.3g} -> {after:.3g}"
        elif r.get("eval_loss"):
            loss = f"{r['eval_loss'][0]:.3g} -> {r['eval_loss'][1]:.3g}"
        status = r["status"] + (f" (eval: {r['eval_verdict']})" if r.get("eval_verdict") else "")
        rows.append((r["name"], method, steps, loss, r["updated"] or "", status))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[-1] for row in rows)
