"""A 3-node Ray cluster on this machine (cluster/local.sh: head + 2 worker nodes, token auth),
the tiny job submitted with `ft-ray submit` and with `ray job submit`; the training workers
must land on both worker nodes, and `down` must leave no process of the cluster behind.

The working dir is used in place (`local://`): raylets sharing one machine would each unpack
an uploaded one into the same folder, deleting it under the running driver (Ray's
working_dir plugin always overwrites). What an upload sends is tested in test_submit.py.

Runs before the integration tests (alphabetical), so it never shares the machine's CPUs
with the session's local Ray."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from tests.conftest import REPO

pytestmark = [pytest.mark.slow]

DASHBOARD_PORT = "8276"


def cluster(*args: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(REPO / "cluster" / "local.sh"), *args], env=env, capture_output=True,
                          text=True, timeout=180)


@pytest.fixture()
def local_cluster():
    temp = f"/tmp/ftr-{uuid.uuid4().hex[:6]}"  # short: Ray's socket paths must fit in 107 bytes
    env = {**os.environ, "FT_RAY_LOCAL_TEMP": temp, "FT_RAY_LOCAL_PORT": "6391",
           "FT_RAY_LOCAL_DASHBOARD_PORT": DASHBOARD_PORT, "RAY_AUTH_MODE": "token",
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    env.pop("RAY_ADDRESS", None)
    up = cluster("up", "--workers", "2", "--cpus-per-node", "3", env=env)
    assert up.returncode == 0, up.stdout + up.stderr
    assert f"http://127.0.0.1:{DASHBOARD_PORT}" in up.stdout and "ray job submit" in up.stdout
    try:
        yield env, temp
    finally:
        down = cluster("down", env=env)
        assert down.returncode == 0
        left = subprocess.run(["pgrep", "-f", temp], capture_output=True, text=True)
        assert left.stdout.strip() == "", f"Ray processes left after down: {left.stdout}"


def job_args(tmp_path: Path, name: str) -> list[str]:
    sets = {"run_name": name, "storage.path": str(tmp_path / "runs"), "train.max_steps": 2,
            "train.eval_every": 2, "train.checkpoint_every": 2, "train.compare_generations": 0,
            "distributed.placement_strategy": "SPREAD"}
    return [arg for key, value in sets.items() for arg in ("--set", f"{key}={value}")]


def ran_on_two_nodes(run: Path) -> list[str]:
    first = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    return first["worker_nodes"]


def test_submit_to_a_local_multi_node_cluster(local_cluster, tmp_path):
    env, _ = local_cluster
    address = f"http://127.0.0.1:{DASHBOARD_PORT}"
    ours = subprocess.run([sys.executable, "-m", "ft_ray", "submit", "configs/tiny-cpu.yaml", "--address", address,
                           "--in-place", "--wait", *job_args(tmp_path, "via-ft-ray-submit")],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert ours.returncode == 0, ours.stdout[-4000:] + ours.stderr[-4000:]
    assert "submitted raysubmit_" in ours.stdout and "ray job logs --follow" in ours.stdout
    run = tmp_path / "runs" / "via-ft-ray-submit"
    assert json.loads((run / "summary.json").read_text())["steps"] == 2
    nodes = ran_on_two_nodes(run)
    assert len(nodes) == 2 and len(set(nodes)) == 2, f"both training workers on one node: {nodes}"

    theirs = subprocess.run(["ray", "job", "submit", "--address", address,
                             "--runtime-env-json", json.dumps({"working_dir": f"local://{REPO}"}),
                             "--", "ft-ray", "train", "configs/tiny-cpu.yaml", *job_args(tmp_path, "via-ray-job-submit")],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert theirs.returncode == 0, theirs.stdout[-4000:] + theirs.stderr[-4000:]
    assert "succeeded" in theirs.stdout.lower()
    assert (tmp_path / "runs" / "via-ray-job-submit" / "summary.json").exists()
