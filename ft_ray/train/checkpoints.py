"""Which checkpoint a run can trust, and the manifest that makes one trusted.

Ray Train uploads each rank's checkpoint files into `<run>/checkpoint-NNNNNN/`. When every
rank has uploaded, rank 0 writes `manifest.json` (each file's size and sha256) into that
folder, last. A checkpoint without a manifest, or whose files differ from it (a crash
mid-upload, a shard deleted, a file truncated), is skipped on resume in favour of the
newest one that checks out; a run never starts over silently.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pyarrow.fs as pafs

from ft_ray.config import InputError
from ft_ray.console import LOG

MANIFEST = "manifest.json"
CHECKPOINT_DIR = re.compile(r"^checkpoint-(\d{6})(?:-(\d+))?$")


class CheckpointError(InputError):
    """A run has checkpoints but none of them is complete."""


def file_digests(folder: Path) -> dict[str, dict]:
    """{relative path: {size, sha256}} of every file under `folder`."""
    digests = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        with open(path, "rb") as f:
            digests[path.relative_to(folder).as_posix()] = {"size": path.stat().st_size, "sha256": sha256_of(f)}
    return digests


def sha256_of(stream) -> str:
    """The hex sha256 of what a binary stream holds, read 1 MiB at a time."""
    sha = hashlib.sha256()
    for chunk in iter(lambda: stream.read(1 << 20), b""):
        sha.update(chunk)
    return sha.hexdigest()


def manifest_json(files: dict[str, dict], step: int, world_size: int) -> str:
    return json.dumps({"step": step, "world_size": world_size, "files": files}, indent=1, sort_keys=True) + "\n"


@dataclass(frozen=True)
class Candidate:
    """A checkpoint folder in storage, newest first by (step, attempt)."""

    name: str
    step: int
    attempt: int

    @classmethod
    def parse(cls, name: str) -> "Candidate | None":
        match = CHECKPOINT_DIR.match(name)
        return cls(name, int(match.group(1)), int(match.group(2) or 0)) if match else None


def list_checkpoints(fs: pafs.FileSystem, run_root: str) -> list[Candidate]:
    """The run's checkpoint folders, newest first (empty when the run folder is new)."""
    try:
        infos = fs.get_file_info(pafs.FileSelector(run_root, allow_not_found=True))
    except FileNotFoundError:
        return []
    found = [Candidate.parse(info.base_name) for info in infos if info.type == pafs.FileType.Directory]
    return sorted((c for c in found if c), key=lambda c: (c.step, c.attempt), reverse=True)


def next_checkpoint_name(existing: list[Candidate], step: int) -> str:
    """`checkpoint-NNNNNN`, or with `-K` when a folder of that step is already there (a run
    that resumed from an older checkpoint reaches the step of a skipped one again): Ray must
    never write into, or later delete, a folder it registered for another checkpoint."""
    taken = {c.attempt for c in existing if c.step == step}
    if not taken:
        return f"checkpoint-{step:06d}"
    return f"checkpoint-{step:06d}-{max(taken) + 1}"


SHA256 = re.compile(r"^[0-9a-f]{64}$")
STATE_FILE = "trainer_state.json"
WEIGHTS_FOLDER = "model/"  # every engine writes the weights there (rank 0)


def manifest_files(manifest: object) -> dict[str, dict]:
    """The `files` of a parsed manifest, checked as data: a non-empty object of
    {relative path: {size: int >= 0, sha256: 64 hex digits}} that lists the trainer state
    and the weights. Anything else means the checkpoint cannot be trusted.

    Raises:
        ValueError: what is malformed.
    """
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict) or not files:
        raise ValueError("it has no file list")
    for name, entry in files.items():
        size = entry.get("size") if isinstance(entry, dict) else None
        sha = entry.get("sha256") if isinstance(entry, dict) else None
        if type(size) is not int or size < 0 or not isinstance(sha, str) or not SHA256.match(sha):
            raise ValueError(f"its entry for {name!r} is not {{size: bytes, sha256: 64 hex digits}}")
        if name.startswith("/") or ".." in name.split("/"):
            raise ValueError(f"it lists a path outside the checkpoint: {name!r}")
    if STATE_FILE not in files or not any(name.startswith(WEIGHTS_FOLDER) for name in files):
        raise ValueError(f"it does not list {STATE_FILE} and the weights ({WEIGHTS_FOLDER}...)")
    return files


def read_manifest(read: Callable[[], bytes]) -> tuple[dict[str, dict] | None, str | None]:
    """(the manifest's checked file list, None), or (None, why the checkpoint is incomplete)."""
    try:
        return manifest_files(json.loads(read().decode("utf-8"))), None
    except FileNotFoundError:
        return None, f"no {MANIFEST} (the upload did not finish)"
    except (OSError, ValueError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        return None, f"malformed {MANIFEST}: {e}"


def manifest_problem(fs: pafs.FileSystem, folder: str) -> str | None:
    """What is wrong with a checkpoint folder in storage by its listing (sizes), or None.
    The sha256 of each file is checked after download (`digest_problem`)."""
    files, problem = stored_manifest(fs, folder)
    return problem or files_problem(files, stored_sizes(fs, folder))


def stored_manifest(fs: pafs.FileSystem, folder: str) -> tuple[dict[str, dict] | None, str | None]:
    """`read_manifest` of a checkpoint folder in storage (local or object store)."""
    def read() -> bytes:
        with fs.open_input_stream(f"{folder}/{MANIFEST}") as f:
            return f.read()

    return read_manifest(read)


def stored_sizes(fs: pafs.FileSystem, folder: str) -> dict[str, int]:
    """{relative path: size} of every file under a folder in storage (none when it is missing)."""
    infos = fs.get_file_info(pafs.FileSelector(folder, recursive=True, allow_not_found=True))
    return {info.path[len(folder) + 1:]: info.size for info in infos if info.type == pafs.FileType.File}


def files_problem(expected: dict[str, dict], sizes: dict[str, int]) -> str | None:
    """The first listed file that is missing or has another size, or None."""
    for name, entry in sorted(expected.items()):
        if name not in sizes:
            return f"{name} is missing"
        if sizes[name] != entry["size"]:
            return f"{name} has {sizes[name]} bytes, the manifest says {entry['size']}"
    return None


def digest_problem(folder: Path) -> str | None:
    """After download (or in a local folder): `stored_digest_problem`."""
    return stored_digest_problem(pafs.LocalFileSystem(), str(folder.resolve()))


def stored_digest_problem(fs: pafs.FileSystem, folder: str) -> str | None:
    """A malformed manifest in a checkpoint folder, or a listed file missing or whose size or
    sha256 differs from the manifest's (every file read once); None when all match."""
    files, problem = stored_manifest(fs, folder)
    return problem or stored_files_problem(fs, folder, files)


def stored_files_problem(fs: pafs.FileSystem, folder: str, files: dict[str, dict]) -> str | None:
    """A listed file of a folder in storage (local or object store) that is missing, or whose
    size or sha256 differs from `files` (a manifest's or winner.json's); None when all match.
    Reads every listed file once."""
    problem = files_problem(files, stored_sizes(fs, folder))
    if problem:
        return problem
    for name, entry in sorted(files.items()):
        with fs.open_input_stream(f"{folder}/{name}") as f:
            actual = sha256_of(f)
        if actual != entry["sha256"]:
            return f"{name} has sha256 {actual[:12]}..., the manifest says {entry['sha256'][:12]}..."
    return None


def no_complete_checkpoint(run_uri: str, skipped: list[tuple[str, str]]) -> CheckpointError:
    reasons = "; ".join(f"{name}: {why}" for name, why in skipped)
    return CheckpointError(
        f"{run_uri} has checkpoints but none is complete ({reasons}). Nothing was deleted. "
        "Start the run over with `ft-ray train CONFIG --force-new` (the old folder is kept aside), "
        "or use another run_name.")


def complete_checkpoints(fs: pafs.FileSystem, run_root: str) -> tuple[list[Candidate], list[tuple[str, str]]]:
    """(checkpoints whose files match their manifest by size, newest first; the others with why)."""
    complete, skipped = [], []
    for candidate in list_checkpoints(fs, run_root):
        problem = manifest_problem(fs, f"{run_root}/{candidate.name}")
        if problem is None:
            complete.append(candidate)
        else:
            skipped.append((candidate.name, problem))
    return complete, skipped


def best_of(complete: list[Candidate], eval_loss_by_step: dict[int, float]) -> Candidate | None:
    """The complete checkpoint with the lowest eval loss at its step (ties and checkpoints
    without an eval: the newest). Chosen from storage, not from Ray's list: after a restart
    Ray may not know a checkpoint the run resumed from (seen when a node died between the
    last checkpoint and the end of the run)."""
    if not complete:
        return None
    return min(complete, key=lambda c: (eval_loss_by_step.get(c.step, math.inf), -c.step, -c.attempt))


RAY_SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray Train's record of a run's checkpoints


def set_aside_stale_snapshot(run: Any) -> str | None:
    """Ray Train refuses to start a run whose record of checkpoints names one that is gone
    ("a corrupted run directory"): a checkpoint folder deleted since, as a user does to roll a
    run back past a bad checkpoint. Such a record is renamed `<name>.stale-<UTC time>` (Ray
    starts a new one; ft-ray resumes from its own listing of the complete checkpoints, not
    from Ray's). Returns the new name, or None when the record is absent or whole."""
    text = run.read_text(RAY_SNAPSHOT)
    if text is None:
        return None
    try:
        snapshot = json.loads(text)
        named = {r["checkpoint_dir_name"] for r in snapshot.get("checkpoint_results", [])}
        latest = snapshot.get("latest_checkpoint_result") or {}
        named |= {latest["checkpoint_dir_name"]} if "checkpoint_dir_name" in latest else set()
    except (ValueError, TypeError, KeyError, AttributeError):
        return None  # a format this version does not know: Ray's own to judge
    gone = sorted(name for name in named if run.fs.get_file_info(run.path(name)).type == pafs.FileType.NotFound)
    if not gone:
        return None
    stale = f"{RAY_SNAPSHOT}.stale-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}"
    run.fs.move(run.path(RAY_SNAPSHOT), run.path(stale))
    LOG.warning(f"{run.uri}: {', '.join(gone)} named by Ray Train's record of the run's checkpoints no longer "
                f"exist(s) (deleted since): the record is set aside as {stale}; the run resumes from the newest "
                "complete checkpoint left")
    return stale
