"""What the fault tests share: the faulted job's schedule, the outcome of a run as the tests
compare it, and ways to wait for an event or take processes away.

The reference (one uninterrupted run of that job) is the session fixture `reference_run` in
conftest.py: test_recovery.py and e2e/test_cluster.py compare their faulted runs with it.
"""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
import torch
from safetensors.torch import load_file

STEPS, EVERY = 12, 4
TRAIN = {"max_steps": STEPS, "checkpoint_every": EVERY, "eval_every": EVERY, "trace_samples": True,
         "keep_checkpoints": 3}
# 48 records, one packed sequence each at the tiny job's 128 tokens: 6 micro batches of 4 per
# worker and epoch, so the 12 steps are two epochs and the checkpoint at step 8 lies inside
# the second, reshuffled one (a resume there must read its order again)
DATA = {"train": str(Path(__file__).resolve().parent / "assets" / "short-train.jsonl")}
EPOCH_STEPS = 6


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


def assert_same_training(outcome: Outcome, reference: Path) -> None:
    """Every step once, the same samples on each rank in each step, the same final weights."""
    expected = outcome_in(reference)
    assert [m["step"] for m in outcome.metrics if "loss" in m] == list(range(1, STEPS + 1))
    assert len(expected.trace) == 2, expected.trace.keys()
    for name, steps in expected.trace.items():  # said step by step: which step of which rank differs
        got = outcome.trace.get(name, [])
        assert got == steps, (name, [(a, b) for a, b in zip(got, steps) if a != b][:3], len(got), len(steps))
    for name, tensor in expected.weights.items():
        torch.testing.assert_close(outcome.weights[name], tensor, rtol=1e-4, atol=1e-5)


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


def ray_actor_processes(*classes: str) -> list[psutil.Process]:
    """The processes of Ray actors of these classes started beneath this test process: the
    session's local Ray, or a Ray a subprocess started (Ray titles an actor's process
    `ray::<class>`): training workers, Train controllers, sweep trials. Another test run or
    bench on the same machine is none of its business."""
    found = []
    for process in psutil.Process().children(recursive=True):
        try:
            cmdline = " ".join(process.cmdline())
        except psutil.Error:  # ended since it was listed
            continue
        if any(f"ray::{name}" in cmdline for name in classes):
            found.append(process)
    return found


def kill_session(process: subprocess.Popen) -> None:
    """SIGKILL a process started with `start_new_session=True` and every process of its session
    (its local Ray: GCS, raylet, Train workers) at once, as a lost machine would; returns when
    none is left, so nothing of it can write to the run folder any more."""
    while True:
        doomed = [p for p in psutil.process_iter() if _session_of(p.pid) == process.pid]
        if not doomed:
            break
        kill_processes(doomed)
    process.wait()


def kill_processes(processes: list[psutil.Process]) -> None:
    """SIGKILL these processes at once (one that ended since it was listed is passed over);
    returns when they are gone or 30 s have passed."""
    for victim in processes:
        try:
            victim.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(processes, timeout=30)


def _session_of(pid: int) -> int | None:
    """The process's session id; None once it is gone or a zombie (dead, not yet reaped)."""
    try:
        if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
            return None
        return os.getsid(pid)
    except (OSError, psutil.Error):
        return None
