"""Shared fixtures: one local Ray instance per test session, tiny job files, test assets."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
ASSETS = Path(__file__).resolve().parent / "assets"
DEMO = REPO / "ft_ray" / "assets" / "demo"

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")  # quicker reports in short test runs
# A credential that must never appear in a run folder, a log or W&B (set before Ray starts,
# so every worker has it in its environment, as a real key would be).
SECRET_CANARY = "ftray-canary-secret-0123456789"
os.environ["WANDB_API_KEY"] = SECRET_CANARY


def tiny_job(tmp_path: Path, **sections) -> dict:
    """A job that trains the built-in model for a few steps on the demo corpus."""
    job = {
        "run_name": "test-run",
        "model": {"name_or_path": "builtin:tiny-llama", "max_seq_len": 128},
        "data": {"train": str(DEMO / "train.jsonl"), "eval": str(DEMO / "eval.jsonl")},
        "lora": {"rank": 4, "alpha": 8, "dropout": 0.0},
        "distributed": {"num_workers": 2},
        "train": {"learning_rate": 2e-3, "max_steps": 4, "micro_batch_size": 4, "eval_every": 2,
                  "checkpoint_every": 2, "warmup_steps": 1, "log_every": 1},
        "storage": {"path": str(tmp_path / "runs")},
    }
    for section, values in sections.items():
        if isinstance(values, dict):
            job.setdefault(section, {}).update(values)
        else:
            job[section] = values
    return job


def write_job(tmp_path: Path, name: str = "job.yaml", **sections) -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(tiny_job(tmp_path, **sections), sort_keys=False))
    return path


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray for the session: 2 training workers plus room for the data pipeline."""
    import ray

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=True)
    yield ray
    ray.shutdown()
