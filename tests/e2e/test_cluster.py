"""A 3-node Ray cluster on this machine (cluster/local.sh: head + 2 worker nodes, token auth),
the tiny DPO job submitted with `ft-ray submit` (its reference log-probs computed by actors on
the cluster) and the fault tests' SFT job with `ray job submit` (a worker node lost under it);
the training workers must land on both worker nodes, and `down` must leave no process of the
cluster behind.

The working dir is used in place (`local://`): raylets sharing one machine would each unpack
an uploaded one into the same folder, deleting it under the running driver (Ray's
working_dir plugin always overwrites). What an upload sends is tested in test_submit.py.

Runs before the integration tests (alphabetical). The session's local Ray starts here too, idle
but for the uninterrupted reference run the lost-node run is compared with."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import psutil
import pytest

from tests.conftest import REPO, write_job
from tests.faults import DATA, TRAIN, assert_same_training, kill_processes, outcome_in

pytestmark = [pytest.mark.slow]

DASHBOARD_PORT = "8276"


def cluster(*args: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(REPO / "cluster" / "local.sh"), *args], env=env, capture_output=True,
                          text=True, timeout=180)


@pytest.fixture(scope="module")
def local_cluster():
    temp = f"/tmp/ftr-{uuid.uuid4().hex[:6]}"  # short: Ray's socket paths must fit in 107 bytes
    env = {**os.environ, "FT_RAY_LOCAL_TEMP": temp, "FT_RAY_LOCAL_PORT": "6391",
           "FT_RAY_LOCAL_DASHBOARD_PORT": DASHBOARD_PORT, "RAY_AUTH_MODE": "token",
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    env.pop("RAY_ADDRESS", None)
    # each worker node advertises an A10G (24 GB) that does not exist: what ft-ray's fit check reads
    up = cluster("up", "--workers", "2", "--cpus-per-node", "3", "--fake-gpus-per-node", "1", "--gpu-type", "A10G",
                 env=env)
    assert up.returncode == 0, up.stdout + up.stderr
    assert f"http://127.0.0.1:{DASHBOARD_PORT}" in up.stdout and "ray job submit" in up.stdout
    try:
        yield env, temp
    finally:
        down = cluster("down", env=env)
        assert down.returncode == 0
        left = subprocess.run(["pgrep", "-f", temp], capture_output=True, text=True)
        assert left.stdout.strip() == "", f"Ray processes left after down: {left.stdout}"
        shutil.rmtree(temp, ignore_errors=True)  # its session folder (5 MB of logs), else left in /tmp by every run


def job_args(tmp_path: Path, name: str) -> list[str]:
    sets = {"run_name": name, "storage.path": str(tmp_path / "runs"), "train.max_steps": 2,
            "train.eval_every": 2, "train.checkpoint_every": 2, "train.compare_generations": 0,
            "distributed.placement_strategy": "SPREAD",
            "eval.after_training": False}  # the three-arm eval is tested in integration/test_demo.py
    return [arg for key, value in sets.items() for arg in ("--set", f"{key}={value}")]


def ran_on_two_nodes(run: Path) -> list[str]:
    first = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    return first["worker_nodes"]


def test_submit_to_a_local_multi_node_cluster(local_cluster, tmp_path):
    env, _ = local_cluster
    address = f"http://127.0.0.1:{DASHBOARD_PORT}"
    ours = subprocess.run([sys.executable, "-m", "ft_ray", "submit", "configs/tiny-dpo.yaml", "--address", address,
                           "--in-place", "--wait", *job_args(tmp_path, "via-ft-ray-submit")],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert ours.returncode == 0, ours.stdout[-4000:] + ours.stderr[-4000:]
    assert "submitted raysubmit_" in ours.stdout and "ray job logs --follow" in ours.stdout
    run = tmp_path / "runs" / "via-ft-ray-submit"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["objective"] == "dpo"
    nodes = ran_on_two_nodes(run)
    assert len(nodes) == 2 and len(set(nodes)) == 2, f"both training workers on one node: {nodes}"


def test_submit_refuses_a_job_that_cannot_fit_the_clusters_gpus(local_cluster, tmp_path):
    env, _ = local_cluster

    def submit_gpu_job(micro_batch: int, *extra: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "ft_ray", "submit", "configs/tiny-cpu.yaml", "--address",
                               f"http://127.0.0.1:{DASHBOARD_PORT}", "--in-place", "--set", "distributed.use_gpu=true",
                               "--set", f"train.micro_batch_size={micro_batch}", *extra],
                              cwd=REPO, env=env, capture_output=True, text=True, timeout=300)

    refused = submit_gpu_job(16384)  # 4M tokens per micro batch: far past a 24 GB card
    out = refused.stdout + refused.stderr
    assert refused.returncode == 2, out
    assert "does not fit the cluster's GPUs" in out and "smallest GPU (A10G) has 22.4 GiB" in out
    assert "--force" in out and "submitted" not in refused.stdout
    fits = submit_gpu_job(4, "--dry-run")
    assert fits.returncode == 0 and re.search(r"plan: peak 0\.\d GiB per worker", fits.stdout), fits.stdout + fits.stderr
    assert "dry run: nothing submitted" in fits.stdout
    assert "cannot place the training workers" not in fits.stdout
    # workers of 4 CPUs on nodes of 3: said before the job is submitted
    too_wide = submit_gpu_job(4, "--dry-run", "--set", "distributed.cpus_per_worker=4")
    assert ("note: the cluster's nodes cannot place the training workers now: no node has 4 CPU, 1 GPU for one "
            "worker (the largest has 3 CPU, 1 GPU)") in too_wide.stdout, too_wide.stdout + too_wide.stderr
    forced = submit_gpu_job(16384, "--dry-run", "--force")
    assert forced.returncode == 0 and "plan:" not in forced.stdout
    # ft-ray plan, and ft-ray tune, against the cluster RAY_ADDRESS names
    on_cluster = {**env, "RAY_ADDRESS": f"http://127.0.0.1:{DASHBOARD_PORT}"}
    too_large = ["--set", "distributed.use_gpu=true", "--set", "train.micro_batch_size=16384"]
    planned = subprocess.run([sys.executable, "-m", "ft_ray", "plan", "configs/tiny-cpu.yaml", *too_large], cwd=REPO,
                             env=on_cluster, capture_output=True, text=True, timeout=300)
    assert planned.returncode == 2 and "does NOT fit the cluster's smallest GPU (A10G) (22.4 GiB)" in planned.stdout
    assert "would fit with --set train.micro_batch_size=" in planned.stdout
    swept = subprocess.run([sys.executable, "-m", "ft_ray", "tune", "configs/sweep-tiny.yaml", *too_large,
                            "--set", f"storage.path={tmp_path / 'runs'}"], cwd=REPO, env=on_cluster,
                           capture_output=True, text=True, timeout=300)
    assert swept.returncode == 2 and "does not fit the cluster's GPUs" in swept.stdout + swept.stderr
    assert not (tmp_path / "runs").exists()  # refused before anything ran


def node_job(tmp_path: Path, name: str) -> Path:
    """The fault tests' job (tests/faults.py), its two workers on two nodes."""
    return write_job(tmp_path, f"{name}.yaml", run_name=name, data=DATA, train=TRAIN,
                     distributed={"num_workers": 2, "placement_strategy": "SPREAD"})


def ray_job_submit(env: dict, job: Path) -> str:
    """`ray job submit --no-wait` of `ft-ray train` the job (its folder the working dir, used in
    place), as a user of Ray's own CLI does; returns the submission id."""
    submission = f"{job.stem}-{uuid.uuid4().hex[:6]}"
    submitted = subprocess.run(["ray", "job", "submit", "--address", f"http://127.0.0.1:{DASHBOARD_PORT}", "--no-wait",
                                "--submission-id", submission,
                                "--runtime-env-json", json.dumps({"working_dir": f"local://{job.parent}"}),
                                "--", "ft-ray", "train", job.name], env=env, capture_output=True, text=True, timeout=120)
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr
    return submission


def job_status(env: dict, submission: str) -> str:
    done = subprocess.run(["ray", "job", "status", submission, "--address", f"http://127.0.0.1:{DASHBOARD_PORT}"],
                          env=env, capture_output=True, text=True, timeout=60)
    # Ray's CLI logs "Job 'ID' succeeded" / "... failed" / "... was stopped", else
    # "Status for job 'ID': RUNNING" (or PENDING), through its logger.
    out = (done.stdout + done.stderr).lower()
    for word, status in (("' succeeded", "SUCCEEDED"), ("' failed", "FAILED"), ("' was stopped", "STOPPED"),
                         ("': running", "RUNNING"), ("': pending", "RUNNING")):
        if f"{submission.lower()}{word}" in out:
            return status
    raise AssertionError(f"no status for {submission}: {out[-1000:]}")


def lose_node(node_id: str) -> int:
    """SIGKILL every process of one Ray node (raylet, agents, and the workers under them) at once."""
    daemons = [p for p in psutil.process_iter(["cmdline"]) if node_id in " ".join(p.info["cmdline"] or [])]
    kill_processes(daemons + [c for d in daemons for c in d.children(recursive=True)])
    return len(daemons)


def test_a_lost_worker_node_costs_a_restart_not_the_run(local_cluster, reference_run, tmp_path):
    # Compared with the same job run without faults on the session's local Ray (`reference_run`):
    # where the workers ran does not change what they compute.
    env, _ = local_cluster
    submission = ray_job_submit(env, node_job(tmp_path, "node-lost"))
    run = tmp_path / "runs" / "node-lost"
    deadline = time.monotonic() + 300
    asked = 0.0  # `ray job status` is a process of its own on 2 busy cores: asked every 10 s, not every poll
    while not (run / "checkpoint-000004" / "manifest.json").exists() or \
            not any('"step": 5' in line for line in (run / "metrics.jsonl").read_text().splitlines()):
        assert time.monotonic() < deadline, "no checkpoint 4"
        if time.monotonic() - asked > 10:
            assert job_status(env, submission) == "RUNNING", "the job ended before checkpoint 4"
            asked = time.monotonic()
        time.sleep(0.5)
    nodes = ran_on_two_nodes(run)
    assert lose_node(nodes[1]) >= 1, f"no process of node {nodes[1]} found"

    # `ray job logs --follow` returns when the job has ended
    logs = subprocess.run(["ray", "job", "logs", "--follow", submission, "--address",
                           f"http://127.0.0.1:{DASHBOARD_PORT}"], env=env, capture_output=True, text=True,
                          timeout=900).stdout
    status = job_status(env, submission)
    assert status == "SUCCEEDED", logs[-4000:]
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    [resume] = [m for m in metrics if "resumed_from" in m]
    # Lost after step 5: the newest complete checkpoint is 4 (8 if the kill came late).
    assert resume["resumed_from"] in (str(run / "checkpoint-000004"), str(run / "checkpoint-000008"))
    assert nodes[1] not in resume["worker_nodes"], "a worker restarted on the lost node"
    assert_same_training(outcome_in(run), reference_run)
