"""A run killed after a checkpoint continues from it when relaunched: same final step count,
no step twice in metrics.jsonl, the same samples in the same steps and the same final weights
as a run never interrupted. The driver runs as `ft-ray train` in its own process group
(with its own local Ray), so the kill takes everything with it, as a lost machine would."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file

from ft_ray.config import load_config
from ft_ray.train.trainer import run_training
from tests.conftest import write_job

pytestmark = [pytest.mark.integration, pytest.mark.slow]

STEPS, CHECKPOINT_EVERY = 10, 4


def ft_ray(*args: str) -> list[str]:
    return [sys.executable, "-m", "ft_ray", *args]


def wait_for(condition, timeout: float, what: str, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        if process.poll() is not None:
            raise AssertionError(f"ft-ray exited ({process.returncode}) before {what}")
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def kill_machine(driver: subprocess.Popen) -> None:
    """SIGKILL the driver and every process it started (its local Ray: GCS, raylet, Train
    workers) at once, as a lost machine would. Killing the driver alone let orphaned workers
    train on for minutes on a loaded machine."""
    processes = [psutil.Process(driver.pid)]
    try:
        processes += processes[0].children(recursive=True)
    except psutil.NoSuchProcess:
        pass
    for process in processes:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(processes, timeout=30)
    driver.wait()


def settle(path, quiet_s: float = 8.0, timeout: float = 60.0) -> None:
    deadline, last, since = time.monotonic() + timeout, None, time.monotonic()
    while time.monotonic() < deadline:
        now = path.read_text()
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since > quiet_s:
            return
        time.sleep(0.5)


def trace(run) -> dict[str, list]:
    """The packed-sequence ids each rank trained on, step by step."""
    return {f.name: [json.loads(line) for line in f.read_text().splitlines()]
            for f in sorted(run.glob("samples-rank*.jsonl"))}


def test_killed_run_resumes_from_its_checkpoint(ray_local, tmp_path):
    # An elastic worker range: Ray Train starts with what the cluster has (2 workers here).
    train = {"max_steps": STEPS, "checkpoint_every": CHECKPOINT_EVERY, "eval_every": CHECKPOINT_EVERY,
             "trace_samples": True}
    job = write_job(tmp_path, run_name="resume", distributed={"num_workers": [1, 2]}, train=train)
    run = tmp_path / "runs" / "resume"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    log = open(tmp_path / "first.log", "w")
    first = subprocess.Popen(ft_ray("train", str(job)), stdout=log, stderr=subprocess.STDOUT, env=env,
                             start_new_session=True)
    try:
        snapshot = run / "checkpoint_manager_snapshot.json"
        wait_for(lambda: snapshot.exists() and "checkpoint-000004" in snapshot.read_text(), 300,
                 "the first checkpoint", first)
    finally:
        kill_machine(first)
    # Ray's own processes die a moment after the driver (they fate-share with it); a controller still
    # alive in that moment can register one more checkpoint. Wait until the snapshot stops changing.
    settle(snapshot)
    killed_at = max((json.loads(l)["step"] for l in (run / "metrics.jsonl").read_text().splitlines()), default=0)
    assert killed_at < STEPS, "the run finished before it was killed; the test proves nothing"
    # The newest checkpoint Ray had registered when the run died (4, or 8 if it got that far).
    latest = max(int(m) for m in re.findall(r"checkpoint-(\d{6})", snapshot.read_text()))

    second = subprocess.run(ft_ray("train", str(job)), capture_output=True, text=True, env=env, timeout=600)
    (tmp_path / "second.log").write_text(second.stdout + second.stderr)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]

    lines = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    [resume] = [m for m in lines if "resumed_from" in m]
    assert resume["step"] == latest and resume["resumed_from"].endswith(f"checkpoint-{latest:06d}")
    assert [m["step"] for m in lines if "loss" in m] == list(range(1, STEPS + 1))
    assert [m["step"] for m in lines if "eval_loss" in m] == [0, 4, 8, 10]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == STEPS
    assert summary["eval_loss_final"] < summary["eval_loss_initial"]

    # The same job never interrupted (in this process's Ray) saw the same samples in the same
    # steps, and ends with the same weights.
    reference = run_training(load_config(write_job(tmp_path, "reference.yaml", run_name="reference",
                                                   distributed={"num_workers": 2}, train=train)))
    expected = trace(tmp_path / "runs" / "reference")
    assert len(expected) == 2 and [m["step"] for m in expected["samples-rank0.jsonl"]] == list(range(1, STEPS + 1))
    assert trace(run) == expected
    resumed_weights = load_file(run / "adapter" / "adapter_model.safetensors")
    reference_weights = load_file(Path(reference["adapter_path"]) / "adapter_model.safetensors")
    for name, tensor in reference_weights.items():
        torch.testing.assert_close(resumed_weights[name], tensor, rtol=1e-4, atol=1e-5)
