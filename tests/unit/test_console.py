"""What the terminal gets: ft-ray's lines only (Ray's output in the log), plain progress lines
in a pipe, a live bar in a terminal, and the root cause of a failure."""

from __future__ import annotations

import os
import pty
import re
import sys

import pytest
from ray import cloudpickle

from ft_ray import console, progress
from ft_ray.console import LOG, quiet_session, root_cause

ESCAPE = re.compile(r"\x1b|\r")


def test_a_quiet_session_sends_everything_but_ft_rays_lines_to_the_log(tmp_path, capfd):
    log = tmp_path / "run" / "logs" / "train.log"
    with quiet_session(log):
        os.write(1, b"2026-11-30 INFO worker.py -- Ray noise on fd 1\n")
        os.write(2, b"(pid=1) Dataset train_0 execution finished\n")
        print("a library's print", file=sys.__stdout__, flush=True)  # pytest swaps sys.stdout; fd 1 is the point
        LOG.info("step 10/100")
        LOG.warning("a warning of ours")
    out, err = capfd.readouterr()
    # (a session-wide local Ray may forward its own lines to pytest's stand-in for sys.stdout)
    assert [line for line in out.splitlines() if line.startswith("[ft-ray]")] == [
        f"[ft-ray] log: {log} (Ray, workers, libraries; --verbose shows it here)",
        "[ft-ray] step 10/100", "[ft-ray] warning: a warning of ours"]
    noise = ("Ray noise on fd 1", "Dataset train_0 execution finished", "a library's print")
    assert not any(line in out + err for line in noise)
    text = log.read_text()
    for line in (*noise, "ft_ray INFO step 10/100", "ft_ray WARNING a warning of ours"):
        assert line in text
    print("after")  # the streams are the process's own again
    assert capfd.readouterr().out == "after\n"


def test_progress_in_a_pipe_is_plain_lines_at_a_steady_rate(monkeypatch, capsys):
    clock = [0.0]
    monkeypatch.setattr(progress.time, "monotonic", lambda: clock[0])
    display = progress.Display("train", 100, "steps", live=False)
    for step in range(1, 101):
        clock[0] += 0.5  # 50 s in all: a line per 10% (at least 2 s apart)
        display.update(step, f"loss {1 / step:.3g}")
    display.close()
    lines = capsys.readouterr().out.splitlines()
    assert 9 <= len(lines) <= 11 and not any(ESCAPE.search(line) for line in lines)
    assert lines[0].startswith("[ft-ray] train: 10/100 steps  loss 0.1  5 s  ETA 45 s")
    assert lines[-1].startswith("[ft-ray] train: 100/100 steps  loss 0.01  50 s")

    burst = progress.Display("eval", 48, "examples", live=False)  # all done at once: one line, not six
    for done in range(8, 49, 8):
        burst.update(done)
    burst.close()
    assert capsys.readouterr().out.splitlines() == ["[ft-ray] eval: 48/48 examples  0 s"]

    slow = progress.Display("read + tokenize", None, "records", live=False)  # no total: every 30 s
    for _ in range(4):
        clock[0] += 20
        slow.update(slow.done + 100)
    slow.close()
    assert capsys.readouterr().out.splitlines() == ["[ft-ray] read + tokenize: 200 records  5 records/s  40 s",
                                                    "[ft-ray] read + tokenize: 400 records  5 records/s  80 s"]


def read_all(fd: int) -> str:
    """Everything written to a pty so far: one read returns at most what one chunk of the
    line discipline holds (a loaded CI machine once saw only the first frame of the bar)."""
    import select

    chunks = []
    while select.select([fd], [], [], 0.5)[0]:
        chunk = os.read(fd, 65536)
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks).decode()


def test_progress_in_a_terminal_is_a_live_bar(monkeypatch):
    leader, follower = pty.openpty()
    terminal = os.fdopen(follower, "w", buffering=1)
    monkeypatch.setattr(console.TERMINAL, "out", terminal)
    display = progress.Display("train", 20, "steps")
    assert display.live
    for step in range(1, 21):
        display.update(step, "loss 0.5")
    print("a print of Ray's")
    LOG.info("a line printed while the bar runs")
    display.close()
    terminal.flush()
    shown = read_all(leader)
    terminal.close()
    os.close(leader)
    assert "\x1b[" in shown and "[ft-ray] train" in shown and "20/20" in shown and "loss 0.5" in shown
    assert "[ft-ray] a line printed while the bar runs" in shown
    assert "a print of Ray's" not in shown  # the process's own stdout is not taken over by the display


def remote_error() -> Exception:
    """A worker's exception as Ray hands it to the driver: the remote traceback as text."""
    return RuntimeError("Traceback (most recent call last):\n"
                        '  File "/repo/ft_ray/train/loop.py", line 48, in train_loop_per_worker\n'
                        "    model = build_model(config)\n"
                        '  File "/venv/safetensors/torch.py", line 315, in load_file\n'
                        "safetensors_rust.SafetensorError: Error while deserializing header: HeaderTooLarge")


class WorkerGroupError(Exception):
    def __init__(self, worker_failures):
        super().__init__("Training failed due to worker errors")
        self.worker_failures = worker_failures


def test_the_root_cause_is_the_first_exception_with_where_it_was_raised():
    def load():
        raise KeyError("lm_head.weight")

    try:
        try:
            load()
        except KeyError as e:
            raise ValueError("could not build the model") from e
    except ValueError as e:
        cause, where = root_cause(e)
    assert cause == "KeyError: 'lm_head.weight'"
    assert where == f"{__file__}:{load.__code__.co_firstlineno + 1}"

    cause, where = root_cause(WorkerGroupError({1: ValueError("rank 1"), 0: remote_error()}))
    assert cause == "safetensors_rust.SafetensorError: Error while deserializing header: HeaderTooLarge"
    assert where == "/venv/safetensors/torch.py:315, from /repo/ft_ray/train/loop.py:48"

    # Ray Train: the worker's exception without its traceback, the traceback in the wrapper's text
    wrapper = WorkerGroupError({0: ValueError("header too large")})
    wrapper.args = (f"Training failed due to worker errors:\n[Rank 0 Error Snippet]:\n{remote_error()}",)
    assert root_cause(wrapper) == ("ValueError: header too large",
                                   "/venv/safetensors/torch.py:315, from /repo/ft_ray/train/loop.py:48")


def test_a_failure_names_its_root_cause_and_the_log(tmp_path, capfd):
    log = tmp_path / "train.log"
    with quiet_session(log):
        try:
            raise OSError("no space left on device")
        except OSError as e:
            console.report_failure(e, log)
    out, err = capfd.readouterr()
    assert err.splitlines()[0].startswith("[ft-ray] error: OSError: no space left on device (at ")
    assert err.splitlines()[1] == f"[ft-ray] error: the full log: {log}"
    assert "Traceback (most recent call last)" in log.read_text()


@pytest.mark.parametrize("value, verbose", [("", False), ("0", False), ("1", True), ("yes", True)])
def test_ft_ray_verbose_shows_everything(monkeypatch, value, verbose):
    monkeypatch.setenv(console.VERBOSE_ENV, value)
    assert console.verbose_requested() is verbose


class Trial:
    def __init__(self, trial_id: str, config: dict, last_result: dict | None = None):
        self.trial_id, self.config, self.last_result = trial_id, config, last_result or {}


def test_a_sweep_shows_a_line_per_trial_start_and_end_and_a_live_table(monkeypatch, capsys):
    from ft_ray.tune import TrialLines

    slow = Trial("a_00001", {"train.learning_rate": 3.76e-4, "lora.rank": 32}, {"step": 20, "eval_loss": 2.2912})
    good = Trial("a_00000", {"train.learning_rate": 3.13e-3, "lora.rank": 16}, {"step": 100, "eval_loss": 0.49524})
    lines = TrialLines("eval_loss", 100, live=False, finished=lambda trial: trial is good)
    for trial in (good, slow):
        lines.on_trial_start(0, [], trial)
    lines.on_trial_complete(0, [], slow)
    lines.on_trial_complete(0, [], good)
    lines.on_experiment_end([])
    assert capsys.readouterr().out.splitlines() == [
        "[ft-ray] trial a_00000 started: rank=16 learning_rate=0.00313",
        "[ft-ray] trial a_00001 started: rank=32 learning_rate=0.000376",
        "[ft-ray] trial a_00001 stopped by the scheduler at step 20: eval_loss 2.291",
        "[ft-ray] trial a_00000 finished at step 100: eval_loss 0.4952"]

    leader, follower = pty.openpty()
    terminal = os.fdopen(follower, "w", buffering=1)
    monkeypatch.setattr(console.TERMINAL, "out", terminal)
    table = TrialLines("eval_loss", 100, live=True, finished=lambda trial: True)
    table.on_trial_start(0, [], good)
    cloudpickle.dumps(table)  # Tune saves its run config, callbacks included, while the table is live
    table.on_trial_result(0, [], good, {"step": 40, "eval_loss": 0.65})
    table.on_trial_complete(0, [], good)
    table.on_experiment_end([])
    terminal.flush()
    shown = read_all(leader)
    terminal.close()
    os.close(leader)
    assert "[ft-ray] running trials" in shown and "40/100" in shown and "0.65" in shown
    assert "[ft-ray] trial a_00000 finished at step 100: eval_loss 0.4952" in shown


def test_output_read_by_something_that_stops_reading_ends_without_a_traceback(tmp_path, monkeypatch, capfd):
    # `ft-ray plan JOB | head -1`: head exits, the next write finds the pipe closed
    from ft_ray.cli import main
    from tests.conftest import write_job

    read, write = os.pipe()
    os.close(read)  # every write to the pipe fails at once
    with os.fdopen(write, "w", buffering=1) as stdout:
        monkeypatch.setattr(sys, "stdout", stdout)
        assert main(["plan", str(write_job(tmp_path))], capture=True) == 1
        print("the flush at exit", file=stdout)  # the pipe's descriptor now leads nowhere, without an error
    assert capfd.readouterr().err == ""
