"""`ft-ray submit`: run a job file on a Ray cluster through the Ray Jobs API.

The working directory travels as the job's `working_dir`, minus local bulk (virtual
environments, run folders, git history). No environment variable is put in the
runtime_env: the dashboard shows those in plain text, so credentials reach the cluster as
Kubernetes Secrets, instance roles or the nodes' own environment instead.
"""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any

from ft_ray.config import InputError, load_config

EXCLUDES = [".venv", "venv", ".git", "runs", "wandb", ".pytest_cache", "__pycache__", "*.egg-info",
            ".gpu-bundle", "*.safetensors", "*.bin", "*.pt"]
# The built-in model's weights are data the job needs (excluded above only as a pattern).
KEEP = "!ft_ray/assets/tiny-llama/model.safetensors"


def build_submission(config_path: Path, overrides: list[str], tune: bool, working_dir: Path,
                     pip: list[str] | None = None, in_place: bool = False) -> dict[str, Any]:
    """Entrypoint and runtime_env of a submission; the config is validated here first.

    `in_place`: the working dir already sits at the same path on every node (a shared
    mount, the image, or a one-machine cluster), so nothing is uploaded (`local://`). On
    one machine with several raylets an upload would be unpacked by each node into the
    same folder, deleting it under the running driver.

    Raises:
        ConfigError: the job file is invalid (nothing is submitted).
        InputError: the job file is not inside the working directory that is uploaded.
    """
    load_config(config_path, overrides)
    try:
        relative = Path(config_path).resolve().relative_to(working_dir.resolve())
    except ValueError:
        raise InputError(f"{config_path}: the job file must be inside the uploaded working dir {working_dir}") from None
    command = ["ft-ray", "tune" if tune else "train", str(relative)]
    for override in overrides:
        command += ["--set", override]
    runtime_env: dict[str, Any] = (
        {"working_dir": f"local://{working_dir.resolve()}"} if in_place
        else {"working_dir": str(working_dir), "excludes": EXCLUDES + [KEEP]})
    if pip:
        runtime_env["pip"] = pip
    return {"entrypoint": shlex.join(command), "runtime_env": runtime_env}


def submit(config_path: Path, address: str | None, overrides: list[str], tune: bool = False,
           working_dir: Path = Path("."), pip: list[str] | None = None, wait: bool = False,
           in_place: bool = False) -> tuple[str, str]:
    """Submit the job; returns (submission id, final status or "SUBMITTED")."""
    from ray.job_submission import JobSubmissionClient

    submission = build_submission(config_path, overrides, tune, working_dir, pip, in_place)
    if "://" not in load_config(config_path, overrides).storage.path:
        print("note: storage.path is a local folder: on a multi-node cluster it must be storage every node "
              "mounts (or s3://), and a relative path lands in the job's working dir copy")
    client = JobSubmissionClient(address)
    job_id = _submit_when_ready(client, submission)
    target = f" --address {address}" if address else ""
    print(f"submitted {job_id}: {submission['entrypoint']}")
    print(f"follow:  ray job logs --follow {job_id}{target}")
    print(f"status:  ray job status {job_id}{target}")
    if not wait:
        return job_id, "SUBMITTED"
    _follow(client, job_id)
    return job_id, str(client.get_job_status(job_id))


def _submit_when_ready(client: Any, submission: dict, wait_s: float = 60) -> str:
    """Submit, retrying while a freshly started head has no job agent yet."""
    import time

    deadline = time.monotonic() + wait_s
    while True:
        try:
            return client.submit_job(**submission)
        except RuntimeError as e:
            if "No available agent" not in str(e) or time.monotonic() > deadline:
                raise
            time.sleep(2)


def _follow(client: Any, job_id: str) -> None:
    """Print the job's log as it arrives, until the job ends."""
    import asyncio

    async def tail():
        async for chunk in client.tail_job_logs(job_id):
            print(chunk, end="", flush=True)

    asyncio.run(tail())
