"""The embedded default (`make demo`) end to end: exact output files, a golden initial eval
loss, the promised improvement (eval loss at least 30% lower), and the closing comparison
with the base model and few-shot prompting of it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ft_ray.cli import main
from ft_ray.config import load_config
from ft_ray.evaluation.evaluate import resolve_target
from tests.conftest import REPO

pytestmark = [pytest.mark.integration, pytest.mark.slow]

# The base model and the eval set are fixed, so the loss before training is too.
GOLDEN_INITIAL_EVAL_LOSS = 5.1489


def test_demo_config_fine_tunes_the_house_style(ray_local, tmp_path, capsys):
    code = main(["train", str(REPO / "configs" / "tiny-cpu.yaml"), "--set", f"storage.path={tmp_path}"])
    out = capsys.readouterr().out
    assert code == 0
    run = tmp_path / "tiny-cpu"
    assert {p.name for p in run.iterdir()} >= {
        "config.yaml", "metrics.jsonl", "summary.json", "eval.json", "adapter", "base_model",
        "checkpoint-000100", "checkpoint_manager_snapshot.json"}
    assert {p.name for p in (run / "adapter").iterdir()} >= {"adapter_config.json", "adapter_model.safetensors",
                                                             "tokenizer.json"}
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 100
    assert summary["eval_loss_initial"] == pytest.approx(GOLDEN_INITIAL_EVAL_LOSS, abs=2e-3)
    assert summary["eval_loss_final"] <= 0.7 * summary["eval_loss_initial"]
    assert f"summary: {run}/summary.json" in out
    assert "eval loss 5.1489 before" in out
    evaluation = json.loads((run / "eval.json").read_text())
    assert evaluation["examples"] == 48 and evaluation["generated"] == 8
    arms = evaluation["arms"]
    assert arms["base"]["loss"] == pytest.approx(GOLDEN_INITIAL_EVAL_LOSS, abs=2e-3)  # same targets as training's eval
    assert evaluation["verdict"]["outcome"] == "variant_better" and evaluation["vs_base"]["outcome"] == "variant_better"
    assert arms["variant"]["loss"] < arms["few_shot"]["loss"] and arms["variant"]["loss"] < arms["base"]["loss"]
    assert arms["variant"]["format"] >= 0.75 and arms["base"]["format"] == 0.0  # the house style is learned
    assert arms["variant"]["chrf"] > arms["base"]["chrf"]
    sample = evaluation["samples"][0]
    assert sample["variant"].startswith("Hi ") and "Northwind team" in sample["variant"]
    assert "Northwind team" not in sample["base"]  # the base model does not know the house style
    assert f"verdict: {evaluation['verdict']['sentence']}" in out

    # `ft-ray eval --run` takes the run folder (its exported adapter) or a checkpoint (exported first)
    config = load_config(REPO / "configs" / "tiny-cpu.yaml", [f"storage.path={tmp_path}"])
    assert resolve_target(str(run), config).weights == str(run / "adapter")
    from_checkpoint = resolve_target(str(run / "checkpoint-000100"), config)
    assert from_checkpoint.folder.root == str(run) and from_checkpoint.train_examples == summary["data"]["train_examples"]
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in Path(from_checkpoint.weights).iterdir()}
