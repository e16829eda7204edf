"""A failure seen from the terminal: a worker's exception ends `ft-ray train` with exit code 1,
its root cause (type, message, file and line) on the terminal, and the whole traceback in the
run's log, whose path is printed; nothing of Ray's own troubles in that log."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from ft_ray.config import ModelConfig
from ft_ray.models import save_base_model
from tests.conftest import REPO, write_job

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_a_worker_failure_prints_its_root_cause_and_the_log(tmp_path):
    model = save_base_model(ModelConfig(name_or_path="builtin:tiny-llama"), tmp_path / "model")
    (model / "model.safetensors").write_bytes(b"\xff" * 64)  # the tokenizer loads; the weights do not
    job = write_job(tmp_path, model={"name_or_path": str(model)}, distributed={"num_workers": 1, "max_failures": 0})
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "FT_RAY_VERBOSE")}
    done = subprocess.run([sys.executable, "-m", "ft_ray", "train", str(job)], capture_output=True, text=True,
                          env=env, cwd=REPO, timeout=600)
    assert done.returncode == 1, done.stdout + done.stderr
    [log] = (tmp_path / "runs" / "test-run" / "logs").glob("train-*.log")
    errors = done.stderr.splitlines()
    assert re.fullmatch(r"\[ft-ray\] error: SafetensorError: .*header.* \(at .+\.py:\d+, "
                        r"from .+/ft_ray/train/modeling\.py:\d+\)", errors[-2]), errors
    assert errors[-1] == f"[ft-ray] error: the full log: {log}"
    text = log.read_text()
    assert "Traceback (most recent call last)" in text
    # Ray Train's placement-group cleaner reached this Ray's state API: no warning a second,
    # no monitor dead on "multiple active Ray instances" (trainer.connect_ray)
    assert "(PlacementGroupCleaner" not in text
    assert "Traceback" not in done.stdout + done.stderr  # the terminal gets the cause, not 100 lines of stack
