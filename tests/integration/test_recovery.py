"""Nothing lost when a part fails: each case ends with the planned step count, every step
once in metrics.jsonl, the same samples in the same steps and the same final weights
(rtol 1e-4, atol 1e-5) as one uninterrupted run of the same job (`reference`), or with the
exact error expected. tests/RELIABILITY.md tabulates the cases; the lost-node case is in
tests/e2e/test_cluster.py (it needs a multi-node cluster)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load, load_file

from ft_ray.cli import main
from ft_ray.config import InputError, load_config
from ft_ray.train.checkpoints import MANIFEST, complete_checkpoints
from ft_ray.train.trainer import run_training
from tests.conftest import REPO, make_bucket, write_job

pytestmark = [pytest.mark.integration, pytest.mark.slow]

STEPS, EVERY = 12, 4
TRAIN = {"max_steps": STEPS, "checkpoint_every": EVERY, "eval_every": EVERY, "trace_samples": True,
         "keep_checkpoints": 3}


@dataclass
class Outcome:
    metrics: list[dict]
    trace: dict[str, list]  # samples-rank<N>.jsonl: the packed-sequence ids of each step
    weights: dict[str, torch.Tensor]


def outcome_in(run: Path) -> Outcome:
    return Outcome(metrics=jsonl((run / "metrics.jsonl").read_text()),
                   trace={f.name: jsonl(f.read_text()) for f in sorted(run.glob("samples-rank*.jsonl"))},
                   weights=load_file(run / "adapter" / "adapter_model.safetensors"))


def jsonl(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


@pytest.fixture(scope="module")
def reference(ray_local, tmp_path_factory) -> Path:
    """The job run once without faults; returns its run folder."""
    tmp = tmp_path_factory.mktemp("reference")
    run_training(load_config(write_job(tmp, run_name="reference", train=TRAIN)))
    return tmp / "runs" / "reference"


def assert_recovered(outcome: Outcome, reference: Path) -> dict:
    """The checks every case shares; returns the resume line of metrics.jsonl."""
    expected = outcome_in(reference)
    assert [m["step"] for m in outcome.metrics if "loss" in m] == list(range(1, STEPS + 1))
    assert [m["step"] for m in outcome.metrics if "eval_loss" in m] == [0, 4, 8, 12]
    assert len(expected.trace) == 2 and outcome.trace == expected.trace
    for name, tensor in expected.weights.items():
        torch.testing.assert_close(outcome.weights[name], tensor, rtol=1e-4, atol=1e-5)
    resumes = [m for m in outcome.metrics if "resumed_from" in m]
    assert len(resumes) == 1, resumes
    return resumes[0]


def wait_for(condition, timeout: float, what: str, process: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        if process is not None and process.poll() is not None:
            raise AssertionError(f"ft-ray exited ({process.returncode}) before {what}")
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def in_background(action) -> tuple[threading.Thread, list]:
    """Run `action` next to a training run in this process; its result or error lands in the list."""
    done: list = []

    def target():
        try:
            done.append(action())
        except BaseException as e:  # noqa: BLE001 - reported by the test
            done.append(e)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, done


def kill_tree(root: psutil.Process) -> None:
    """SIGKILL a process and every process under it at once, as a lost machine would."""
    processes = [root]
    try:
        processes += root.children(recursive=True)
    except psutil.NoSuchProcess:
        pass
    for process in processes:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(processes, timeout=30)


def settle(run: Path, quiet_s: float = 8.0, timeout: float = 60.0) -> None:
    """Wait until the run's checkpoints stop changing."""
    deadline, last, since = time.monotonic() + timeout, None, time.monotonic()
    while time.monotonic() < deadline:
        now = sorted(str(p) for p in run.rglob(MANIFEST))
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since > quiet_s:
            return
        time.sleep(0.5)


def test_driver_killed_and_relaunched_resumes(reference, tmp_path):
    # The driver runs as `ft-ray train` with its own local Ray, in its own process group; the kill
    # takes all of it (GCS, raylet, Train workers), as a lost head machine would.
    job = write_job(tmp_path, run_name="driver-killed", distributed={"num_workers": [1, 2]}, train=TRAIN)
    run = tmp_path / "runs" / "driver-killed"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    with open(tmp_path / "first.log", "w") as log:
        first = subprocess.Popen([sys.executable, "-m", "ft_ray", "train", str(job)], stdout=log,
                                 stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            wait_for(lambda: (run / "checkpoint-000004" / MANIFEST).exists(), 300, "the first checkpoint", first)
        finally:
            kill_tree(psutil.Process(first.pid))
            first.wait()
    # Ray's own processes die a moment after the driver; a worker still alive can complete one
    # more checkpoint. Wait until they stop changing, then see what the run left.
    settle(run)
    killed_at = max(m["step"] for m in jsonl((run / "metrics.jsonl").read_text()))
    assert killed_at < STEPS, "the run finished before it was killed; the test proves nothing"
    newest = complete_checkpoints(*_local(run))[0][0].name

    second = subprocess.run([sys.executable, "-m", "ft_ray", "train", str(job)], capture_output=True, text=True,
                            env=env, timeout=600)
    (tmp_path / "second.log").write_text(second.stdout + second.stderr)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    resume = assert_recovered(outcome_in(run), reference)
    assert resume["resumed_from"] == str(run / newest)
    assert json.loads((run / "summary.json").read_text())["steps"] == STEPS


def _local(run: Path):
    import pyarrow.fs as pafs

    return pafs.LocalFileSystem(), str(run)


def training_workers() -> list[psutil.Process]:
    found = []
    for process in psutil.process_iter(["cmdline"]):
        if "RayTrainWorker" in " ".join(process.info["cmdline"] or []):
            found.append(process)
    return found


def test_training_worker_killed_restarts_the_group(reference, tmp_path):
    run = tmp_path / "runs" / "worker-killed"

    def kill_a_worker() -> int:
        wait_for(lambda: (run / "checkpoint-000004" / MANIFEST).exists(), 300, "the first checkpoint")
        wait_for(lambda: '{"step": 6,' in (run / "metrics.jsonl").read_text(), 120, "step 6")
        [victim, *_] = training_workers()
        victim.kill()  # abrupt, like os._exit or the OOM killer: no cleanup, no goodbye
        return victim.pid

    thread, done = in_background(kill_a_worker)
    summary = run_training(load_config(write_job(tmp_path, run_name="worker-killed", train=TRAIN)))
    thread.join(60)
    assert done and isinstance(done[0], int), f"no worker was killed: {done}"
    resume = assert_recovered(outcome_in(run), reference)
    assert resume["resumed_from"] == str(run / "checkpoint-000004") and resume["step"] == 4
    assert summary["steps"] == STEPS


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_proxy(port: int, target: int) -> subprocess.Popen:
    proxy = subprocess.Popen([sys.executable, "-m", "tests.tcp_proxy", str(port), str(target)], cwd=REPO,
                             stdout=subprocess.PIPE, text=True)
    assert proxy.stdout.readline().strip() == "listening"
    return proxy


def test_object_store_down_during_a_checkpoint_upload(reference, s3_server, tmp_path):
    client = make_bucket(s3_server, "outage")
    port = free_port()
    proxies = [start_proxy(port, int(s3_server.rsplit(":", 1)[1]))]

    def s3_text(key: str) -> str:
        try:
            return client.get_object(Bucket="outage", Key=key)["Body"].read().decode()
        except client.exceptions.NoSuchKey:
            return ""

    def take_the_store_away() -> float:
        # metrics.jsonl reaches the store right before checkpoint 4 is saved and uploaded.
        wait_for(lambda: any(m.get("step") == 4 for m in jsonl(s3_text("runs/outage/metrics.jsonl"))), 300,
                 "step 4 in the store")
        proxies[0].kill()
        proxies[0].wait()
        started = time.monotonic()
        time.sleep(8)
        proxies.append(start_proxy(port, int(s3_server.rsplit(":", 1)[1])))
        return time.monotonic() - started

    job = write_job(tmp_path, run_name="outage", train=TRAIN,
                    storage={"path": "s3://outage/runs", "endpoint_url": f"http://127.0.0.1:{port}"})
    thread, done = in_background(take_the_store_away)
    try:
        summary = run_training(load_config(job))
        thread.join(60)
    finally:
        for proxy in proxies:
            proxy.kill()
    assert done and isinstance(done[0], float) and done[0] >= 8, f"the store was not taken away: {done}"
    assert summary["adapter_path"] == "s3://outage/runs/outage/adapter"
    outcome = Outcome(
        metrics=jsonl(s3_text("runs/outage/metrics.jsonl")),
        trace={f"samples-rank{r}.jsonl": jsonl(s3_text(f"runs/outage/samples-rank{r}.jsonl")) for r in (0, 1)},
        weights=load(client.get_object(Bucket="outage", Key="runs/outage/adapter/adapter_model.safetensors")
                     ["Body"].read()))
    expected = outcome_in(reference)
    assert [m["step"] for m in outcome.metrics if "loss" in m] == list(range(1, STEPS + 1))
    assert outcome.trace == expected.trace
    for name, tensor in expected.weights.items():
        torch.testing.assert_close(outcome.weights[name], tensor, rtol=1e-4, atol=1e-5)
    manifest = json.loads(s3_text("runs/outage/checkpoint-000012/manifest.json"))
    assert "model/adapter_model.safetensors" in manifest["files"]


def test_incomplete_checkpoints_are_skipped_for_the_newest_complete_one(reference, tmp_path, capfd):
    run = tmp_path / "runs" / "damaged"
    shutil.copytree(reference, run)
    (run / "checkpoint-000012" / "optimizer.pt").unlink()  # a shard lost
    adapter = run / "checkpoint-000008" / "model" / "adapter_model.safetensors"
    adapter.write_bytes(adapter.read_bytes()[:1000])  # a file cut short
    run_training(load_config(write_job(tmp_path, run_name="damaged", train=TRAIN)))
    resume = assert_recovered(outcome_in(run), reference)
    assert resume["resumed_from"] == str(run / "checkpoint-000004")
    assert resume["skipped_checkpoints"] == [
        "checkpoint-000012: optimizer.pt is missing",
        f"checkpoint-000008: model/adapter_model.safetensors has 1000 bytes, the manifest says {_size(reference)}"]
    assert f"skipping checkpoint {run}/checkpoint-000012: optimizer.pt is missing" in capfd.readouterr().out
    # The steps trained again went to new folders; the damaged ones are left as they were.
    assert (run / "checkpoint-000008-1" / MANIFEST).exists() and (run / "checkpoint-000012-1" / MANIFEST).exists()


def _size(reference: Path) -> int:
    return (reference / "checkpoint-000008" / "model" / "adapter_model.safetensors").stat().st_size


def test_relaunch_with_a_changed_config_is_refused_unless_force_new(reference, tmp_path):
    run = tmp_path / "runs" / "changed"
    shutil.copytree(reference, run)
    changed = load_config(write_job(tmp_path, run_name="changed", train={**TRAIN, "learning_rate": 1e-3}))
    with pytest.raises(InputError, match=r"train.learning_rate: 0.002 -> 0.001.*--force-new"):
        run_training(changed)
    assert sorted(p.name for p in run.parent.iterdir()) == ["changed"]  # nothing touched

    job = write_job(tmp_path, run_name="changed", train={**TRAIN, "learning_rate": 1e-3, "max_steps": 2})
    assert main(["train", str(job), "--force-new"]) == 0
    [aside] = [p for p in run.parent.iterdir() if p.name.startswith("changed.replaced-")]
    assert (aside / "checkpoint-000012" / MANIFEST).exists()
    metrics = jsonl((run / "metrics.jsonl").read_text())
    assert [m["step"] for m in metrics if "loss" in m] == [1, 2] and not any("resumed_from" in m for m in metrics)


def test_unreachable_store_fails_the_run_naming_the_uri(ray_local, tmp_path, capsys):
    job = write_job(tmp_path, run_name="nowhere", storage={
        "path": "s3://no-store/runs", "endpoint_url": f"http://127.0.0.1:{free_port()}", "max_attempts": 2})
    assert main(["train", str(job)]) == 1
    err = capsys.readouterr().err
    assert "error: cannot list s3://no-store/runs/nowhere" in err, err


def test_a_run_with_only_incomplete_checkpoints_is_not_restarted_silently(reference, tmp_path):
    run = tmp_path / "runs" / "all-damaged"
    shutil.copytree(reference, run)
    for manifest in run.glob(f"checkpoint-*/{MANIFEST}"):
        manifest.unlink()
    with pytest.raises(InputError, match="has checkpoints but none is complete.*--force-new"):
        run_training(load_config(write_job(tmp_path, run_name="all-damaged", train=TRAIN)))

