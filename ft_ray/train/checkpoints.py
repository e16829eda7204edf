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
from dataclasses import dataclass
from pathlib import Path

import pyarrow.fs as pafs

from ft_ray.config import InputError

MANIFEST = "manifest.json"
CHECKPOINT_DIR = re.compile(r"^checkpoint-(\d{6})(?:-(\d+))?$")


class CheckpointError(InputError):
    """A run has checkpoints but none of them is complete."""


def file_digests(folder: Path) -> dict[str, dict]:
    """{relative path: {size, sha256}} of every file under `folder`."""
    digests = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        sha = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                sha.update(chunk)
        digests[path.relative_to(folder).as_posix()] = {"size": path.stat().st_size, "sha256": sha.hexdigest()}
    return digests


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


def manifest_problem(fs: pafs.FileSystem, folder: str) -> str | None:
    """What is wrong with a checkpoint folder in storage by its listing (sizes), or None.
    The sha256 of each file is checked after download (`digest_problem`)."""
    try:
        with fs.open_input_stream(f"{folder}/{MANIFEST}") as f:
            manifest = json.loads(f.read().decode("utf-8"))
    except FileNotFoundError:
        return f"no {MANIFEST} (the upload did not finish)"
    except (OSError, ValueError) as e:
        return f"unreadable {MANIFEST}: {e}"
    infos = fs.get_file_info(pafs.FileSelector(folder, recursive=True))
    sizes = {info.path[len(folder) + 1:]: info.size for info in infos if info.type == pafs.FileType.File}
    return files_problem(manifest.get("files", {}), sizes)


def files_problem(expected: dict[str, dict], sizes: dict[str, int]) -> str | None:
    """The first listed file that is missing or has another size, or None."""
    for name, entry in sorted(expected.items()):
        if name not in sizes:
            return f"{name} is missing"
        if sizes[name] != entry["size"]:
            return f"{name} has {sizes[name]} bytes, the manifest says {entry['size']}"
    return None


def digest_problem(folder: Path) -> str | None:
    """After download: a file whose sha256 differs from the manifest's, or None."""
    manifest = json.loads((folder / MANIFEST).read_text())
    actual = file_digests(folder)
    problem = files_problem(manifest["files"], {name: d["size"] for name, d in actual.items()})
    if problem:
        return problem
    for name, entry in sorted(manifest["files"].items()):
        if actual[name]["sha256"] != entry["sha256"]:
            return f"{name} has sha256 {actual[name]['sha256'][:12]}..., the manifest says {entry['sha256'][:12]}..."
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
