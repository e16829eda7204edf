"""Nothing lost when a part fails: each case ends with the planned step count, every step
once in metrics.jsonl, the same samples in the same steps and the same final weights
(rtol 1e-4, atol 1e-5) as one uninterrupted run of the same job (the session's
`reference_run`), or with the exact error expected. tests/RELIABILITY.md tabulates the cases;
the lost-node case is in tests/e2e/test_cluster.py (it needs a multi-node cluster)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from safetensors.torch import load

from ft_ray.cli import main
from ft_ray.config import InputError, load_config
from ft_ray.train.checkpoints import MANIFEST, complete_checkpoints
from ft_ray.train.trainer import free_port, run_training
from tests.conftest import REPO, make_bucket, write_job
from tests.faults import (DATA, EPOCH_STEPS, STEPS, TRAIN, Outcome, assert_same_training, in_background, jsonl,
                          kill_session, outcome_in, ray_actor_processes, wait_for)

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def assert_recovered(outcome: Outcome, reference_run: Path) -> dict:
    """The checks every case shares; returns the resume line of metrics.jsonl."""
    assert_same_training(outcome, reference_run)
    assert [m["step"] for m in outcome.metrics if "eval_loss" in m] == [0, 4, 8, 12]
    resumes = [m for m in outcome.metrics if "resumed_from" in m]
    assert len(resumes) == 1, resumes
    return resumes[0]


def test_the_reference_reads_every_sequence_once_an_epoch_the_second_epoch_reshuffled(reference_run):
    """The faulted job's 12 steps are two epochs (tests/faults.py): each rank's second epoch
    reads its first's sequences in another order (train.epoch_shuffle_buffer), so the cases
    here that resume inside it (from step 8) or cross into it (from step 4) check that order.
    metrics.jsonl says how many epochs each step has read."""
    reference = outcome_in(reference_run)
    ranks = []
    for name, steps in reference.trace.items():
        ids = [step["seq_ids"] for step in steps]
        first, second = ids[:EPOCH_STEPS], ids[EPOCH_STEPS:]
        flat = [i for step in first for i in step]
        assert len(set(flat)) == len(flat) and sorted(flat) == sorted(i for step in second for i in step), name
        assert {frozenset(s) for s in first}.isdisjoint(frozenset(s) for s in second), (name, first, second)
        ranks.append(set(flat))
    assert len(ranks) == 2 and not ranks[0] & ranks[1]  # each rank its own sequences
    epochs = {m["step"]: m["epoch"] for m in reference.metrics if "loss" in m}
    assert [epochs[s] for s in (1, 3, EPOCH_STEPS, EPOCH_STEPS + 3, STEPS)] == [round(1 / 6, 3), 0.5, 1, 1.5, 2]
    assert json.loads((reference_run / "summary.json").read_text())["epochs"] == 2


def test_driver_killed_and_relaunched_resumes(reference_run, tmp_path):
    # The driver runs as `ft-ray train` with its own local Ray, in its own process group; the kill
    # takes all of it (GCS, raylet, Train workers), as a lost head machine would.
    job = write_job(tmp_path, run_name="driver-killed", distributed={"num_workers": [1, 2]}, data=DATA, train=TRAIN)
    run = tmp_path / "runs" / "driver-killed"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    with open(tmp_path / "first.log", "w") as log:
        first = subprocess.Popen([sys.executable, "-m", "ft_ray", "train", str(job)], stdout=log,
                                 stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            wait_for(lambda: (run / "checkpoint-000004" / MANIFEST).exists(), 300, "the first checkpoint", first)
        finally:
            kill_session(first)  # returns when no process of it is left to write
    killed_at = max(m["step"] for m in jsonl((run / "metrics.jsonl").read_text()))
    assert killed_at < STEPS, "the run finished before it was killed; the test proves nothing"
    newest = complete_checkpoints(*_local(run))[0][0].name

    second = subprocess.run([sys.executable, "-m", "ft_ray", "train", str(job)], capture_output=True, text=True,
                            env=env, timeout=600)
    (tmp_path / "second.log").write_text(second.stdout + second.stderr)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    resume = assert_recovered(outcome_in(run), reference_run)
    assert resume["resumed_from"] == str(run / newest)
    assert json.loads((run / "summary.json").read_text())["steps"] == STEPS


def _local(run: Path):
    import pyarrow.fs as pafs

    return pafs.LocalFileSystem(), str(run)


def test_a_hung_worker_is_timed_out_and_the_group_restarted(reference_run, tmp_path):
    # SIGSTOP: the process is alive and holds its resources but never answers; the other
    # rank's collective gives up after distributed.timeout_s and Ray Train restarts the group.
    run = tmp_path / "runs" / "worker-hung"
    stopped: list[psutil.Process] = []

    def stop_a_worker() -> int:
        wait_for(lambda: (run / "checkpoint-000004" / MANIFEST).exists(), 300, "the first checkpoint")
        wait_for(lambda: '{"step": 6,' in (run / "metrics.jsonl").read_text(), 120, "step 6")
        [victim, *_] = ray_actor_processes("RayTrainWorker")
        victim.suspend()
        stopped.append(victim)
        return victim.pid

    thread, done = in_background(stop_a_worker)
    try:
        summary = run_training(load_config(write_job(tmp_path, run_name="worker-hung", data=DATA, train=TRAIN,
                                                     distributed={"timeout_s": 15})))
    finally:
        for process in stopped:  # never leave a stopped process behind, whatever happened
            try:
                process.kill()
            except psutil.NoSuchProcess:
                pass
    thread.join(60)
    assert done and isinstance(done[0], int), f"no worker was stopped: {done}"
    resume = assert_recovered(outcome_in(run), reference_run)
    assert resume["resumed_from"] == str(run / "checkpoint-000004") and resume["step"] == 4
    assert summary["steps"] == STEPS


def start_proxy(port: int, target: int) -> subprocess.Popen:
    proxy = subprocess.Popen([sys.executable, "-m", "tests.tcp_proxy", str(port), str(target)], cwd=REPO,
                             stdout=subprocess.PIPE, text=True)
    assert proxy.stdout.readline().strip() == "listening"
    return proxy


def test_object_store_down_during_a_checkpoint_upload(reference_run, s3_server, tmp_path):
    """A run in the store, of the built-in model's files in the store (model.name_or_path:
    s3://..., each worker and data task reading them through the node's model cache): the store
    goes away for 8 s during a checkpoint upload; the run trains as the reference did from the
    built-in model, step for step, to the same weights."""
    from ft_ray.models import BUILTIN

    client = make_bucket(s3_server, "outage")
    for file in BUILTIN["builtin:tiny-llama"].iterdir():
        client.upload_file(str(file), "outage", f"models/tiny-llama/{file.name}")
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

    job = write_job(tmp_path, run_name="outage", data=DATA, train=TRAIN,
                    model={"name_or_path": "s3://outage/models/tiny-llama"},
                    storage={"path": "s3://outage/runs", "endpoint_url": f"http://127.0.0.1:{port}",
                             "model_cache": str(tmp_path / "model-cache")})
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
    assert_same_training(outcome, reference_run)
    manifest = json.loads(s3_text("runs/outage/checkpoint-000012/manifest.json"))
    assert "model/adapter_model.safetensors" in manifest["files"]


def test_incomplete_checkpoints_are_skipped_for_the_newest_complete_one(reference_run, tmp_path, capfd):
    run = tmp_path / "runs" / "damaged"
    shutil.copytree(reference_run, run)
    job = load_config(write_job(tmp_path, run_name="damaged", data=DATA, train=TRAIN))
    before = (run / "metrics.jsonl").read_text()
    # undamaged, the finished run has nothing to train: its summary comes back, nothing changes
    assert run_training(job) == json.loads((reference_run / "summary.json").read_text())
    assert (run / "metrics.jsonl").read_text() == before and "has trained all its 12 steps" in capfd.readouterr().out
    (run / "checkpoint-000012" / "optimizer.pt").unlink()  # a shard lost
    adapter = run / "checkpoint-000008" / "model" / "adapter_model.safetensors"
    adapter.write_bytes(adapter.read_bytes()[:1000])  # a file cut short
    (run / "checkpoint-000008-1").mkdir()  # a manifest that vouches for nothing (no files)
    (run / "checkpoint-000008-1" / MANIFEST).write_text('{"files": {}}')
    partial_line = len((run / "metrics.jsonl").read_text().splitlines()) + 1
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 13, "lo')  # the driver killed while writing a line
    run_training(job)
    resume = assert_recovered(outcome_in(run), reference_run)
    assert resume["resumed_from"] == str(run / "checkpoint-000004")
    assert resume["skipped_checkpoints"] == [
        "checkpoint-000012: optimizer.pt is missing",
        "checkpoint-000008-1: malformed manifest.json: it has no file list",
        f"checkpoint-000008: model/adapter_model.safetensors has 1000 bytes, the manifest says {_size(reference_run)}"]
    out = capfd.readouterr().out
    assert f"skipping checkpoint {run}/checkpoint-000012: optimizer.pt is missing" in out
    assert f"{run}/metrics.jsonl:{partial_line}: dropped a partial line" in out
    assert "the data files changed" not in out  # the reference run's data_files.json: the same files
    # The steps trained again went to new folders; the damaged ones are left as they were.
    assert (run / "checkpoint-000008-2" / MANIFEST).exists() and (run / "checkpoint-000012-1" / MANIFEST).exists()


def _size(reference_run: Path) -> int:
    return (reference_run / "checkpoint-000008" / "model" / "adapter_model.safetensors").stat().st_size


def test_relaunch_with_a_changed_config_is_refused_unless_force_new(reference_run, tmp_path, capfd):
    """A changed learning rate is refused; --force-new starts over. The new run stops early
    (two evaluations that do not lower eval_loss by 100 end it at step 2 of 4, a checkpoint
    there); relaunched as it was it is done; with more patience, the one change a resume
    takes here, it trains on, and an evaluation that lowers eval_loss (step 3) saves a
    checkpoint though none is due."""
    run = tmp_path / "runs" / "changed"
    shutil.copytree(reference_run, run)
    changed = load_config(write_job(tmp_path, run_name="changed", data=DATA, train={**TRAIN, "learning_rate": 1e-3}))
    with pytest.raises(InputError, match=r"train.learning_rate: 0.002 -> 0.001.*--force-new"):
        run_training(changed)
    assert sorted(p.name for p in run.parent.iterdir()) == ["changed"]  # nothing touched

    train = {**TRAIN, "learning_rate": 1e-3, "max_steps": 4, "eval_every": 1, "checkpoint_every": 100,
             "early_stopping_patience": 2, "early_stopping_min_delta": 100.0}
    job = write_job(tmp_path, run_name="changed", data=DATA, train=train)
    assert main(["train", str(job), "--force-new"]) == 0
    [aside] = [p for p in run.parent.iterdir() if p.name.startswith("changed.replaced-")]
    assert (aside / "checkpoint-000012" / MANIFEST).exists()
    metrics = jsonl((run / "metrics.jsonl").read_text())
    assert [m["step"] for m in metrics if "loss" in m] == [1, 2] and not any("resumed_from" in m for m in metrics)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["early_stopping"] == {"step": 2, "best_step": 0, "best_eval_loss": summary["eval_loss_initial"],
                                         "evaluations_without_gain": 2} and summary["planned_steps"] == 4
    assert (f"stopped early at step 2 of 4: eval loss {summary['eval_loss_initial']:.4f} at step 0 was not lowered "
            "by 2 evaluations since (train.early_stopping_patience)") in capfd.readouterr().out
    assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-000002"]
    assert run_training(load_config(job)) == summary  # done: nothing trained again

    more = load_config(write_job(tmp_path, run_name="changed", data=DATA,
                                 train={**train, "early_stopping_patience": 3, "early_stopping_min_delta": 0.0}))
    summary = run_training(more)
    assert summary["steps"] == 4 and summary["early_stopping"] is None
    assert sorted(p.name for p in run.glob("checkpoint-*")) == [f"checkpoint-00000{s}" for s in (2, 3, 4)]


def test_unreachable_store_fails_the_run_naming_the_uri(ray_local, tmp_path, capsys):
    job = write_job(tmp_path, run_name="nowhere", storage={
        "path": "s3://no-store/runs", "endpoint_url": f"http://127.0.0.1:{free_port()}", "max_attempts": 2})
    assert main(["train", str(job)]) == 1
    err = capsys.readouterr().err
    assert "error: cannot list s3://no-store/runs/nowhere" in err, err


def test_a_run_with_only_incomplete_checkpoints_is_not_restarted_silently(reference_run, tmp_path):
    run = tmp_path / "runs" / "all-damaged"
    shutil.copytree(reference_run, run)
    for manifest in run.glob(f"checkpoint-*/{MANIFEST}"):
        manifest.unlink()
    with pytest.raises(InputError, match="has checkpoints but none is complete.*--force-new"):
        run_training(load_config(write_job(tmp_path, run_name="all-damaged", data=DATA, train=TRAIN)))

