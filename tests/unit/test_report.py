"""The HTML report treats what it reads from storage as text: every value it did not write itself
is escaped, and a trial name from sweep.json cannot point outside the sweep's trials folder."""

from __future__ import annotations

import json

import pytest

from ft_ray.config import InputError
from ft_ray.report import write_report

EVIL = "<script>alert(1)</script>"


def sweep_folder(tmp_path, trial: str):
    (tmp_path / "trials" / "t1").mkdir(parents=True)
    (tmp_path / "trials" / "t1" / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n{"step": 1, "eval_loss": 1.5}\n')
    arms = {arm: {"loss": 1.0, "exact_match": 0.0, "chrf": 1.0, "format": 0.0} for arm in ("base", "few_shot", "variant")}
    summary = {"metric": "eval_loss", "mode": f"min{EVIL}",
               "trials": [{"trial": trial, "status": f"finished{EVIL}", "stopped_early": False, "step": 1,
                           "metrics": {"eval_loss": 1.5}, "config": {"lora.rank": EVIL}}],
               "winners": [{"rank": 1, "trial": trial, "uri": f"s3://x/{EVIL}", "metrics": {"eval_loss": 1.5},
                            "eval": {"arms": arms, "verdict": {"sentence": f"the variant {EVIL} wins"}}}]}
    (tmp_path / "sweep.json").write_text(json.dumps(summary))
    return tmp_path


def test_values_read_from_storage_are_escaped(tmp_path):
    page = write_report(str(sweep_folder(tmp_path / "sweep", "t1")), tmp_path / "out").read_text()
    assert EVIL not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page


def test_a_trial_name_that_leaves_the_sweep_folder_is_refused(tmp_path):
    with pytest.raises(InputError, match=r"sweep.json: trial: '\.\./\.\./etc' is not a folder name"):
        write_report(str(sweep_folder(tmp_path / "sweep", "../../etc")), tmp_path / "out")


def test_a_winner_folder_named_by_sweep_json_is_checked_before_anything_is_written(tmp_path):
    from ft_ray.config import load_config
    from ft_ray.evaluation.evaluate import evaluate_sweep
    from tests.conftest import write_job

    sweep = tmp_path / "sweep"
    sweep.mkdir()
    (sweep / "sweep.json").write_text(json.dumps({"winners": [{"rank": 1, "trial": "t1", "uri": f"{sweep}/winners/.."}]}))
    with pytest.raises(InputError, match=r"winners\[0\]\.uri: '\.\.' is not a folder name"):
        evaluate_sweep(load_config(write_job(tmp_path)), str(sweep))
    assert sorted(p.name for p in sweep.iterdir()) == ["sweep.json"]


def test_the_reference_line_is_the_base_models_eval_loss_and_winners_are_shown_in_the_sweep():
    from ft_ray.report import base_eval_loss, relative

    curves = {"t1": [{"step": 0, "eval_loss": 5.15}, {"step": 10, "loss": 2.0}, {"step": 10, "eval_loss": 2.1}],
              "t2": [{"step": 0, "eval_loss": 5.15}, {"step": 10, "eval_loss": 0.9}]}
    assert base_eval_loss(curves) == 5.15  # every run's eval before its first step
    assert base_eval_loss({"t1": [{"step": 10, "eval_loss": 2.1}]}) is None  # resumed past step 0: no line
    assert relative("s3://b/runs/sweep/winners/1-t1", "s3://b/runs/sweep") == "winners/1-t1"
    assert relative("s3://b/elsewhere/w", "s3://b/runs/sweep") == "s3://b/elsewhere/w"


def test_a_sweep_of_reward_models_shows_its_winners_pair_accuracy_against_the_longer_answer(tmp_path):
    """A reward-model sweep's winner, evaluated (`ft-ray eval` of a reward model: held-out pairs,
    no arms' losses), is shown by its pair accuracy beside the longer-answer rule's, with its
    verdict; no loss chart of arms it does not have."""
    import numpy as np

    from ft_ray.config import config_from_dict
    from ft_ray.evaluation.pairs import summarize_pairs

    n = 8  # the model orders 7 of 8 pairs; the longer answer is chosen in half
    cols = {"key": np.array([f"e:{i}" for i in range(n)]), "reason": np.array([""] * n),
            "prompt": np.array(["p"] * n), "chosen_text": np.array(["c"] * n), "rejected_text": np.array(["r"] * n),
            "chosen_score": np.array([1.0] * 7 + [0.0]), "rejected_score": np.array([0.0] * 7 + [1.0]),
            "chosen_tokens": np.array([10, 5] * (n // 2)), "rejected_tokens": np.array([5, 10] * (n // 2))}
    evaluation = summarize_pairs(config_from_dict({"objective": "reward_model", "data": {"train": "t.jsonl"}}), cols)
    sweep = tmp_path / "sweep"
    (sweep / "trials" / "t1").mkdir(parents=True)
    (sweep / "trials" / "t1" / "metrics.jsonl").write_text(
        '{"step": 0, "eval_loss": 0.69, "eval_pair_accuracy": 0.5}\n{"step": 4, "eval_loss": 0.4, "eval_pair_accuracy": 0.8}\n')
    (sweep / "sweep.json").write_text(json.dumps({
        "metric": "eval_pair_accuracy", "mode": "max",
        "trials": [{"trial": "t1", "status": "finished", "stopped_early": False, "step": 4,
                    "metrics": {"eval_pair_accuracy": 0.8}, "config": {"lora.rank": 8}}],
        "winners": [{"rank": 1, "trial": "t1", "uri": f"{sweep}/winners/1-t1", "metrics": {"eval_pair_accuracy": 0.8},
                     "eval": evaluation}]}))
    page = write_report(str(sweep), tmp_path / "out").read_text()
    assert "Does the reward model order the held-out pairs?" in page and "Does fine-tuning pay?" not in page
    assert "<td>t1</td><td>reward model</td><td>0.875</td>" in page
    assert "<td>t1</td><td>the longer answer wins</td><td>0.5</td>" in page
    assert evaluation["verdict"]["sentence"] in page and not (tmp_path / "out" / "arms.png").exists()
