"""The Ray cluster launcher file (cluster/aws-gpu.yaml): token authentication on every node and a
dashboard that only the SSH tunnel reaches, as cluster/local.sh and k8s/ have them."""

from __future__ import annotations

import yaml

from tests.conftest import REPO


def test_every_node_starts_with_token_auth_and_the_dashboard_stays_on_the_head():
    launcher = yaml.safe_load((REPO / "cluster" / "aws-gpu.yaml").read_text())
    starts = [c for key in ("head_start_ray_commands", "worker_start_ray_commands")
              for c in launcher[key] if "ray start" in c]
    assert len(starts) == 2 and all(c.startswith("RAY_AUTH_MODE=token ray start") for c in starts)
    [head] = [c for c in starts if "--head" in c]
    assert "--dashboard-host=127.0.0.1" in head and "0.0.0.0" not in head
    assert launcher["file_mounts"] == {"~/.ray/auth_token": "~/.ray/auth_token"}  # one token for all nodes
