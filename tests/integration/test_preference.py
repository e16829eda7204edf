"""Preference tuning on the real spine: DPO, ORPO and KTO with 2 Ray workers on the demo's
preference pairs (chosen: the house style; rejected: a generic voice), and DPO as a ZeRO-3
full fine-tune with a frozen reference copy."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from ft_ray.config import load_config
from ft_ray.train.trainer import run_training
from tests.conftest import DEMO, write_job

pytestmark = [pytest.mark.integration, pytest.mark.slow]

PAIRS = {"train": str(DEMO / "preference-train.jsonl"), "eval": str(DEMO / "preference-eval.jsonl")}


def preference_job(tmp_path: Path, objective: str, data: dict | None = None, train: dict | None = None,
                   **sections):
    return load_config(write_job(
        tmp_path, run_name=objective, objective=objective, model={"max_seq_len": 512}, data=data or PAIRS,
        train={"learning_rate": 1e-3, "max_steps": 10, "micro_batch_size": 2, "eval_every": 5,
               "checkpoint_every": 10, "warmup_steps": 2, "log_every": 1, **(train or {})}, **sections))


def metrics(config) -> list[dict]:
    run = Path(config.storage.path) / config.run_name
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_dpo_lora_learns_the_house_style_preference(ray_local, tmp_path):
    config = preference_job(tmp_path, "dpo", lora={"rank": 16, "alpha": 32})
    summary = run_training(config)
    # the reference is the model with its adapter off: at step 0 both agree, every pair's
    # reward is 0 and the loss is log 2
    assert summary["objective"] == "dpo"
    assert summary["eval_loss_initial"] == pytest.approx(math.log(2), abs=1e-4)
    assert summary["eval_reward_accuracy_initial"] == 0.0
    assert summary["eval_reward_accuracy_final"] >= 0.9
    assert summary["data"]["formats"] == {"data.train": "preference", "data.eval": "preference"}
    lines = metrics(config)
    steps = [m for m in lines if "loss" in m]
    assert [m["step"] for m in steps] == list(range(1, 11))
    for key in ("rewards_chosen", "rewards_rejected", "reward_accuracy", "reward_margin", "logps_chosen",
                "logps_rejected"):
        assert all(key in m for m in steps) and f"eval_{key}" in lines[0]
    last_eval = [m for m in lines if "eval_loss" in m][-1]
    assert last_eval["eval_reward_margin"] > 0 and last_eval["eval_rewards_chosen"] > last_eval["eval_rewards_rejected"]
    assert Path(summary["adapter_path"], "adapter_model.safetensors").exists()


def test_orpo_and_kto_train_and_improve_their_eval_metric(ray_local, tmp_path):
    config = preference_job(tmp_path, "orpo", train={"max_steps": 6})
    orpo = run_training(config)
    assert orpo["eval_loss_final"] < orpo["eval_loss_initial"]  # no reference: its loss starts at the NLL
    evals = [m for m in metrics(config) if "eval_loss" in m]
    first, last = evals[0], evals[-1]
    assert last["eval_log_odds_ratio"] > first["eval_log_odds_ratio"]  # the chosen answers gain on the rejected
    assert last["eval_logps_chosen"] > first["eval_logps_chosen"]

    # KTO: the same answers unpaired, each labelled good (the house style) or bad
    for split in ("train", "eval"):
        with open(tmp_path / f"kto-{split}.jsonl", "w") as out:
            for i, line in enumerate(Path(PAIRS[split]).read_text().splitlines()):
                pair = json.loads(line)
                good = i % 2 == 0
                out.write(json.dumps({"prompt": f"{pair['instruction']}\n\n{pair['input']}",
                                      "completion": pair["chosen" if good else "rejected"], "label": good}) + "\n")
    kto = run_training(preference_job(
        tmp_path, "kto", data={"train": str(tmp_path / "kto-train.jsonl"), "eval": str(tmp_path / "kto-eval.jsonl")},
        train={"max_steps": 6}))
    assert kto["data"]["formats"] == {"data.train": "kto", "data.eval": "kto"}
    assert kto["eval_reward_accuracy_initial"] == 0.5  # rewards all 0: only the bad answers count as right
    assert kto["eval_reward_accuracy_final"] > 0.8 and kto["eval_loss_final"] < kto["eval_loss_initial"]


def test_dpo_full_fine_tune_under_zero3_with_a_frozen_reference(ray_local, tmp_path):
    config = preference_job(tmp_path, "dpo", method="full",
                            distributed={"strategy": "deepspeed", "deepspeed": {"stage": 3}},
                            train={"learning_rate": 1e-4, "max_steps": 4, "eval_every": 4, "checkpoint_every": 4})
    summary = run_training(config)
    assert summary["steps"] == 4
    assert summary["eval_loss_initial"] == pytest.approx(math.log(2), abs=1e-4)  # the copy equals the start
    assert summary["eval_loss_final"] < summary["eval_loss_initial"]
    assert Path(summary["model_path"], "model.safetensors").exists()
