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
# Credential files never leave the machine, wherever they sit in the working dir (also in .gitignore).
SECRET_EXCLUDES = ["k8s/secrets.yaml", "secrets.yaml", ".env", ".env.*", "*.pem", "*.key", "*.p12", "*.pfx",
                   ".aws", ".ssh", "id_rsa*", "id_ed25519*", ".netrc", ".git-credentials", ".pypirc",
                   "application_default_credentials.json", "service-account*.json", ".config/gcloud"]
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
        else {"working_dir": str(working_dir), "excludes": EXCLUDES + SECRET_EXCLUDES + [KEEP]})
    if pip:
        runtime_env["pip"] = pip
    return {"entrypoint": shlex.join(command), "runtime_env": runtime_env}


def uploaded_files(working_dir: Path, excludes: list[str]) -> list[Path]:
    """The files Ray would upload from `working_dir` with `excludes` (and the .gitignore files
    it honours), walked by Ray's own upload code so the listing is exactly what it sends."""
    from ray._private.runtime_env.packaging import _dir_travel, _get_excludes  # no public equivalent

    root = working_dir.resolve()
    found: list[Path] = []
    _dir_travel(root, [_get_excludes(root, excludes)], lambda p: found.append(p) if p.is_file() else None,
                include_gitignore=True)
    return sorted(p.relative_to(root) for p in found)


def describe(submission: dict[str, Any], working_dir: Path) -> list[str]:
    """What a submission would run and send, for `ft-ray submit --dry-run`."""
    env = submission["runtime_env"]
    lines = [f"entrypoint: {submission['entrypoint']}"]
    if env["working_dir"].startswith("local://"):
        lines.append(f"working dir: {env['working_dir']} (in place: nothing is uploaded)")
    else:
        files = uploaded_files(working_dir, env["excludes"])
        size = sum((working_dir / f).stat().st_size for f in files)
        lines += [f"working dir: {working_dir.resolve()}: {len(files)} files, {size / 2**20:.1f} MiB would be uploaded",
                  "excluded: " + " ".join(env["excludes"]) + " (and what .gitignore files exclude)"]
    if env.get("pip"):
        lines.append("pip: " + " ".join(env["pip"]))
    return lines


def submit(config_path: Path, address: str | None, overrides: list[str], tune: bool = False,
           working_dir: Path = Path("."), pip: list[str] | None = None, wait: bool = False,
           in_place: bool = False, dry_run: bool = False, force: bool = False) -> tuple[str, str]:
    """Submit the job; returns (submission id, final status or "SUBMITTED"). `dry_run` prints
    what would be run and uploaded and submits nothing (returns ("", "DRY_RUN")).

    Raises:
        InputError: the job's plan does not fit the cluster's GPUs (unless `force`); no
            cluster address, or none answering at it.
    """
    import os

    from ray.job_submission import JobSubmissionClient

    submission = build_submission(config_path, overrides, tune, working_dir, pip, in_place)
    address = address or os.environ.get("RAY_ADDRESS")
    if not address and not dry_run:
        raise InputError("no cluster to submit to: pass --address http://HEAD:8265 (its Ray dashboard) or set "
                         "RAY_ADDRESS")
    if not force:
        check_fit(load_config(config_path, overrides), address, config_path)
    if address:
        note_placement(load_config(config_path, overrides), address)
    if dry_run:
        print("\n".join(["dry run: nothing submitted", *describe(submission, working_dir)]))
        return "", "DRY_RUN"
    if "://" not in load_config(config_path, overrides).storage.path:
        print("note: storage.path is a local folder: on a multi-node cluster it must be storage every node "
              "mounts (or s3://), and a relative path lands in the job's working dir copy")
    try:
        client = JobSubmissionClient(address)
    except ConnectionError as e:  # Ray says it in one line below a chain of urllib3 errors
        raise InputError(f"cannot reach a Ray dashboard at {address} ({str(e).strip().splitlines()[-1][:200]}): "
                         "check --address or RAY_ADDRESS (e.g. http://HEAD:8265) and that the cluster is up") from None
    job_id = _submit_when_ready(client, submission)
    target = f" --address {address}" if address else ""
    print(f"submitted {job_id}: {submission['entrypoint']}")
    print(f"follow:  ray job logs --follow {job_id}{target}")
    print(f"status:  ray job status {job_id}{target}")
    if not wait:
        return job_id, "SUBMITTED"
    _follow(client, job_id)
    return job_id, str(client.get_job_status(job_id))


def check_fit(config: Any, address: str | None, config_path: Path) -> None:
    """Raises InputError when the job's memory plan does not fit the cluster's smallest GPU
    (`ft-ray plan`); says so and goes on when the cluster cannot be asked."""
    import os

    from ft_ray.plan import cluster_fit

    address = address or os.environ.get("RAY_ADDRESS")
    if not config.distributed.use_gpu or not address:
        return
    try:
        fits, line = cluster_fit(config, address)
    except InputError as e:
        print(f"note: not checked against the cluster's GPUs: {e}")
        return
    except Exception as e:  # noqa: BLE001 - an unreachable or older cluster: the submission says more
        print(f"note: not checked against the cluster's GPUs ({type(e).__name__}: {str(e)[:200]})")
        return
    print(line)
    if not fits:
        raise InputError(f"the job does not fit the cluster's GPUs: {line.removeprefix('plan: ')}; "
                         f"`ft-ray plan {config_path} --gpu-memory GB` says what would, --force submits anyway")


def note_placement(config: Any, address: str) -> None:
    """Says when the cluster's nodes, as they are now, cannot place the job's training workers
    (the job's driver refuses it then, unless the cluster's autoscaler can add nodes that can:
    which is not known from here)."""
    from ft_ray.plan import cluster_nodes
    from ft_ray.train.placement import least_workers, placement_problem, worker_resources

    try:
        nodes = cluster_nodes(address)
    except Exception:  # noqa: BLE001 - an unreachable or older cluster: the submission says more
        return
    problem = placement_problem(nodes, worker_resources(config), least_workers(config),
                                config.distributed.placement_strategy)
    if problem:
        print(f"note: the cluster's nodes cannot place the training workers now: {problem}. Unless its autoscaler "
              "adds nodes that can, the job is refused when it starts")


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
